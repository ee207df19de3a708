"""The ``README.md`` written into an exported model folder: what it is, what it saw, how it scored.

Small and factual: base model, stage, training data and split, the hyperparameters that define
the stage, and the stage's row of the pipeline report when there is one. Everything is read from
the stage config; keys named like credentials (``api_key``, ``secret``, ``password``, ``token``
in an auth sense) are dropped before anything is read, and the judge's settings are never shown.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pathvlm_lightning.stage_config import init_args, short_name

_SECRET_KEY = re.compile(r"api[_-]?key|secret|password|passwd|credential|auth|(^|_)token$|bearer", re.IGNORECASE)
_HEADER_END = re.compile(r"^(Run|Test|Curves|Usage)\b")


def scrub_secrets(value: Any) -> Any:
    """``value`` with every mapping key that names a credential removed, at any depth.

    >>> scrub_secrets({"judge": {"model": "gpt-4o", "api_key": "sk-1", "api_key_env": "K"}, "max_new_tokens": 8})
    {'judge': {'model': 'gpt-4o'}, 'max_new_tokens': 8}
    """
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [scrub_secrets(v) for v in value]
    return value


def config_description(path: str | Path) -> str:
    """The description at the top of a stage YAML: its leading comment up to the ``Run:`` line."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text or _HEADER_END.match(text):
            break
        lines.append(text)
    return " ".join(lines)


def stage_metrics(report: Mapping[str, Any], stage: str) -> dict[str, Any] | None:
    """The metrics :func:`model_card` shows for ``stage`` from a pipeline ``report.json``: its row
    of ``report["stages"]``, plus ``"ood"`` (its row of ``report["ood"]``) when it was tested out of
    domain; None when the report does not have the stage."""
    row = report.get("stages", {}).get(stage)
    if row is None:
        return None
    metrics = dict(row)
    ood = report.get("ood", {}).get(stage)
    if ood:
        metrics["ood"] = dict(ood)
    level = report.get("settings", {}).get("level")
    if level is not None:
        metrics.setdefault("level", level)
    return metrics


def model_card(
    stage: str, description: str, base_model: str, config: dict, metrics: dict | None
) -> str:
    """Markdown for ``README.md`` of a stage's export.

    ``config`` is the stage YAML as a dict; ``metrics`` the stage's report row (``count``,
    ``accuracy``, ``ci_low``, ``ci_high``, ``format_compliance``, ``avg_output_tokens`` as
    fractions/counts, optional ``ood`` with ``by_modality`` and ``mean_accuracy``; see
    :func:`stage_metrics`) or None.
    """
    config = scrub_secrets(config)
    model = config.get("model", {})
    module = init_args(model)
    data = init_args(config.get("data", {}))
    lines = [f"# {stage}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        f"- Base model: `{base_model}`",
        f"- Training stage: `{stage}` ({short_name(model.get('class_path', '?'))})",
        f"- Format: {_format_line(init_args(module.get('backbone', {})))}",
        "- Answers as `<think>reasoning</think><answer>X) option text</answer>`.",
        "",
        "## Training data",
        "",
        *_data_lines(data),
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in _hyperparameters(config, module)),
    ]
    lines += ["", "## Evaluation", ""] + _metric_lines(metrics)
    return "\n".join(lines) + "\n"


def _format_line(backbone: dict[str, Any]) -> str:
    """How the folder holds the weights (see ``backbone/export.py``: a quantised base keeps its adapter apart)."""
    if backbone.get("lora") and backbone.get("quantization"):
        return "LoRA adapter only, on the quantised base model it names (transformers with peft loads it)."
    merged = " (LoRA merged in)" if backbone.get("lora") else ""
    return (
        f"Qwen2.5-VL weights{merged} and processor; load with "
        "`transformers.AutoModelForImageTextToText.from_pretrained(<this folder>)`."
    )


def _data_lines(data: dict[str, Any]) -> list[str]:
    sizes = data.get("split_sizes")
    split_text = "default"
    if sizes:
        split_text = ", ".join(f"{name} {'rest' if n in (None, -1) else n}" for name, n in sizes.items())
    return [
        f"- data_path: `{data.get('data_path', 'embedded')}` (record_style `{data.get('record_style', 'pathmmu')}`)",
        f"- split sizes: {split_text} (image-grouped, seed {data.get('seed', 0)})",
        f"- trained on split: `{data.get('train_split', 'sft')}`",
    ]


def _hyperparameters(config: dict[str, Any], module: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("module", short_name(config.get("model", {}).get("class_path", "?")))]
    optimizer = module.get("optimizer")
    if isinstance(optimizer, Mapping):
        args = init_args(optimizer)
        rows.append(("optimizer", short_name(optimizer.get("class_path", "?"))))
        rows += [(name, str(args[name])) for name in ("lr", "weight_decay") if name in args]
    backbone = init_args(module.get("backbone", {}))
    if backbone.get("lora"):
        lora = init_args(backbone["lora"])
        rows.append(("LoRA", ", ".join(f"{k}={lora[k]}" for k in ("r", "alpha") if k in lora) or "on"))
    trainer = config.get("trainer", {}) or {}
    unset = (None, -1)  # a resolved config holds every Trainer default; -1 and None mean "no limit" / "default"
    rows += [(name, str(trainer[name])) for name in ("max_epochs", "max_steps", "precision") if trainer.get(name) not in unset]
    data = init_args(config.get("data", {}))
    rows += [(name, str(data[name])) for name in ("batch_size",) if name in data]
    if "loss" in module or "GRPO" in rows[0][1]:
        loss = module.get("loss")
        if isinstance(loss, Mapping):  # class_path + init_args (hparams and YAML name it so)
            rows.append(("loss", short_name(loss.get("class_path", "?"))))
            rows += [(name, str(value)) for name, value in init_args(loss).items()]
        rows += [(name, str(module[name])) for name in ("scale_rewards",) if name in module]
        rows += _parts(module)
    return rows


def _parts(module: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The GRPO parts the module is given (``model.init_args``): rollout settings, rewards, reference."""
    rows = []
    rollout = init_args(module.get("rollout"))
    keys = ("num_generations", "max_new_tokens", "temperature")
    rows += [(key, str(rollout[key])) for key in keys if key in rollout]
    rewards = [
        f"{short_name(c.get('class_path', '?'))} (weight {init_args(c).get('weight', 1.0)})"
        for c in module.get("rewards") or []
        if isinstance(c, Mapping)
    ]
    if rewards:
        rows.append(("rewards", ", ".join(rewards)))
    reference = module.get("reference")
    if isinstance(reference, Mapping):
        sync = init_args(reference).get("sync_every_n_steps")
        rows.append(("reference", "frozen start" if sync is None else f"synced every {sync} steps"))
    elif "reference" in module:
        rows.append(("reference", "none"))
    return rows


def _metric_lines(metrics: Mapping[str, Any] | None) -> list[str]:
    if not metrics or "accuracy" not in metrics:
        return ["No evaluation report was given for this stage."]
    level = round(100 * float(metrics.get("level", 0.95)))
    ci = (
        f"[{_pct(metrics['ci_low'])}, {_pct(metrics['ci_high'])}]"
        if metrics.get("ci_low") is not None and metrics.get("ci_high") is not None
        else "-"
    )
    lines = [
        f"| split | n | accuracy % | {level}% CI | format % | avg output tokens |",
        "|---|---|---|---|---|---|",
        f"| test | {metrics.get('count', '-')} | {_pct(metrics['accuracy'])} | {ci} | "
        f"{_pct(metrics.get('format_compliance'))} | {_number(metrics.get('avg_output_tokens'))} |",
    ]
    ood = metrics.get("ood")
    if isinstance(ood, Mapping) and ood.get("by_modality"):
        lines += ["", "Out of domain:", "", "| modality | n | accuracy % |", "|---|---|---|"]
        lines += [
            f"| {name} | {row.get('count', '-')} | {_pct(row.get('accuracy'))} |"
            for name, row in sorted(ood["by_modality"].items())
        ]
        lines.append(f"| mean over modalities | {ood.get('count', '-')} | {_pct(ood.get('mean_accuracy'))} |")
    return lines


def _pct(fraction: Any) -> str:
    return "-" if fraction is None else f"{100 * float(fraction):.1f}"


def _number(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"
