"""A plan overlay: one LightningCLI config applied after every stage's own configs.

``python -m pathvlm_lightning pipeline --plan configs/pipeline.yaml --config configs/rehearsal_cpu.yaml``
runs each stage as ``fit --config <stage>.yaml --config <out_dir>/<stage>/overlay.yaml``, where that
file is the overlay as it applies to the stage. A plain ``--config`` appended to every command
would not do, for three reasons, which are the overlay's three rules:

- ``trainer.callbacks`` and the GRPO parts (``model.init_args.rollout``, ``.reference`` and each entry
  of ``.rewards``): a config's list replaces the stage's whole list (its rewards and their order),
  and a part would reach an SFT stage that has none. In an overlay each entry instead updates the
  ``init_args`` of the stage's callback or part of the same class, in place (nested values such as
  a judge's merged key by key); a stage without that class is left as it is, and a class that no
  stage of the plan has is an error (a typo).
- ``model.init_args.backbone.init_args.model`` is where the stages that start from no other stage
  (no ``needs``) start; a stage with ``needs`` starts from its parent's model whatever the overlay
  says, as the plan already requires.
- ``run_dir`` and ``base`` are refused: each stage has its own run folder, and the overlay's bases
  would be looked up next to the written copy.

The stage's identity (``state.json``'s config digest) is its config with the overlay applied, so
a changed overlay is noticed like a changed stage file.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pathvlm_lightning.stage_config import PART_KEYS, short_name

#: Keys of an overlay that cannot apply to a whole plan.
REFUSED_KEYS = ("run_dir", "base")
MODEL_KEYS = ("model", "init_args", "backbone", "init_args", "model")


class OverlayError(ValueError):
    """An overlay that cannot be applied as written; the message names the file."""


@dataclass(frozen=True)
class Overlay:
    """One overlay file: its plain values, its callback and part updates and its starting model."""

    path: str
    values: dict[str, Any]  # everything but trainer.callbacks, the GRPO parts and the starting model
    callback_updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # class name -> init_args
    start_model: str | None = None
    part_updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # class name -> init_args


def read_overlay(path: str | Path) -> Overlay:
    """Read and check an overlay file (see the module docstring for what it may say)."""
    source = str(path)
    if not Path(path).is_file():
        raise OverlayError(f"overlay {source!r} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise OverlayError(f"overlay {source}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise OverlayError(f"overlay {source}: not a config (a YAML mapping)")
    refused = [key for key in REFUSED_KEYS if key in raw]
    if refused:
        raise OverlayError(
            f"overlay {source}: sets {refused}, which a plan overlay cannot (each stage has its own run_dir; "
            "name the files to apply with more --config flags instead of base)"
        )
    from pathvlm_lightning import legacy_parts  # imports the callbacks (torch); only when an overlay is read

    try:
        legacy_parts.check_config(raw, f"overlay {source}")
    except legacy_parts.LegacyPartsConfigError as error:
        raise OverlayError(str(error)) from None
    values = copy.deepcopy(raw)
    start_model = _pop_path(values, MODEL_KEYS)
    updates = _updates(source, "trainer.callbacks", _pop_path(values, ("trainer", "callbacks")))
    parts: dict[str, dict[str, Any]] = {}
    for key in PART_KEYS:
        parts.update(_updates(source, f"model.init_args.{key}", _pop_path(values, ("model", "init_args", key))))
    return Overlay(source, values, updates, None if start_model is None else str(start_model), parts)


def _updates(source: str, where: str, listed: Any) -> dict[str, dict[str, Any]]:
    """class name -> init_args of the ``class_path`` entries ``listed`` at ``where`` in an overlay."""
    updates: dict[str, dict[str, Any]] = {}
    for entry in [] if listed is None else listed if isinstance(listed, list) else [listed]:
        if not (isinstance(entry, Mapping) and entry.get("class_path") and isinstance(entry.get("init_args", {}), Mapping)):
            raise OverlayError(
                f"overlay {source}: each {where} entry needs a class_path and init_args "
                f"(it updates the stage's entry of that class), got {entry!r}"
            )
        updates[short_name(entry["class_path"])] = dict(entry.get("init_args") or {})
    return updates


def stage_overlay(
    overlays: Sequence[Overlay],
    callbacks: list[Mapping[str, Any]],
    start_model: str | None,
    parts: Mapping[str, Any] | None = None,
) -> dict:
    """The overlays as one config for a stage whose resolved callbacks are ``callbacks`` and whose GRPO
    parts are ``parts`` (``model.init_args`` key -> its node, or list of nodes for ``rewards``).

    ``start_model``: the model the stage must start from (its parent's, when it has ``needs``), or
    None to take the last overlay's starting model, if any sets one.
    """
    merged: dict[str, Any] = {}
    for overlay in overlays:
        merged = _deep_merge(merged, overlay.values)
        if start_model is None and overlay.start_model is not None:
            _set_path(merged, MODEL_KEYS, overlay.start_model)
    if start_model is not None and any(o.start_model is not None for o in overlays):
        _set_path(merged, MODEL_KEYS, start_model)
    patched = _patched(callbacks, [o.callback_updates for o in overlays if o.callback_updates])
    if patched is not None:
        _set_path(merged, ("trainer", "callbacks"), patched)
    part_updates = [o.part_updates for o in overlays if o.part_updates]
    for key, node in (parts or {}).items():
        patched = _patched(node if isinstance(node, list) else [node], part_updates)
        if patched is not None:
            _set_path(merged, ("model", "init_args", key), patched if isinstance(node, list) else patched[0])
    return merged


def _patched(nodes: Sequence[Any], updates: Sequence[Mapping[str, dict[str, Any]]]) -> list[dict[str, Any]] | None:
    """``nodes`` (``class_path`` entries) with the ``updates`` of their class merged into their
    ``init_args``, or None when no update names one of their classes."""
    nodes = [n for n in nodes if isinstance(n, Mapping)]
    if not any(short_name(n.get("class_path", "")) in u for n in nodes for u in updates):
        return None
    patched = []
    for node in nodes:
        node = copy.deepcopy(dict(node))
        for update in updates:
            name = short_name(node.get("class_path", ""))
            if name in update:
                node["init_args"] = _deep_merge(dict(node.get("init_args") or {}), update[name])
        patched.append(node)
    return patched


def unused_callback_updates(overlays: Sequence[Overlay], stage_callbacks: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """Callback or part classes an overlay updates that no stage has (``stage_callbacks``: each stage's
    callbacks and parts)."""
    present = {short_name(c.get("class_path", "")) for callbacks in stage_callbacks for c in callbacks}
    return [f"{o.path}: {name}" for o in overlays for name in (*o.callback_updates, *o.part_updates) if name not in present]


def overlay_text(config: Mapping[str, Any], overlays: Sequence[Overlay], stage_config: str) -> str:
    """The stage's overlay as the YAML file the runner writes next to its logs."""
    names = ", ".join(o.path for o in overlays)
    header = (
        f"# Written by the pipeline: {names} as it applies to {stage_config} (callbacks and parts updated in place,\n"
        "# the starting model of a stage with `needs` kept). Re-run this stage by hand with\n"
        f"#   python -m pathvlm_lightning fit --config {stage_config} --config <this file>\n"
    )
    return header + yaml.safe_dump(dict(config), sort_keys=False)


def _deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(into)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _pop_path(config: dict[str, Any], keys: Sequence[str]) -> Any:
    """Remove and return ``config[k0][k1]...`` (None when absent); empty parents are removed too."""
    node = config
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return None
    value = node.pop(keys[-1], None)
    if not node and len(keys) > 1:
        _pop_path(config, keys[:-1])
    return value


def _set_path(config: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
