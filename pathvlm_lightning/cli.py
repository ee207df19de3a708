"""``python -m pathvlm_lightning {fit,validate,test,predict} --config X.yaml``.

Model and data are LightningCLI subclass groups (``class_path``/``init_args``). The data module gets
its processor and batch kind from the model once both exist, so a YAML names the checkpoint once.

A config may name the configs it extends, ``base: base_grpo.yaml`` (a path relative to it, or a
list): ``--config X`` then reads the bases first, each with its own bases before it, then X, so a
stage file holds only what differs. (jsonargparse's own nested ``config:`` key cannot take an
``init_args``-only override of a subclass group, which is what a stage overlay mostly is.) Values
may refer to others with ``${run_dir}`` (jsonargparse's ``omegaconf+`` mode: resolved after every
file and flag is merged, so ``--run_dir elsewhere`` moves every path built from it);
``--print_config`` shows the resolved result. ``--log_level`` (anywhere; DEBUG, INFO, WARNING, ERROR)
sets how much of the project's own logging reaches stderr (``pathvlm_lightning/logs.py``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningCLI

from pathvlm_lightning.callbacks.export import ExportCallback
from pathvlm_lightning.callbacks.progress import EpochProgressBar, ProgressLog
from pathvlm_lightning.checkpoint_io import use_atomic_checkpoints
from pathvlm_lightning.checkpoint_sharded import use_atomic_folders
from pathvlm_lightning import legacy_parts
from pathvlm_lightning.grpo.losses import legacy
from pathvlm_lightning.logs import configure_logging, pop_log_level
from pathvlm_lightning.redact import add_secrets, secrets_in_config

_CONFIG_FLAGS = ("-c", "--config")


class ConfigBaseError(ValueError):
    """A ``base:`` that cannot be followed; the message names the config and the base."""


class PathVLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="Folder of this run; the configs derive checkpoints/, tb/, export/ and predictions from ${run_dir}.",
        )
        parser.add_argument(
            "--base",
            type=str | list[str] | None,
            default=None,
            help="Set inside a config file: the config(s) it extends, read before it (paths relative to it).",
        )
        parser.add_argument(
            "--overwrite_export",
            type=bool,
            default=False,
            help="fit: replace a finished export in ExportCallback's folder instead of refusing to start.",
        )
        # Plain progress lines when stdout is a log file (a batch job, nohup); --progress.every_n_steps 0: off.
        parser.add_lightning_class_args(ProgressLog, "progress")
        parser.link_arguments(
            "model", "data.init_args.processor", compute_fn=lambda m: m.backbone.processor, apply_on="instantiate"
        )
        parser.link_arguments(
            "model", "data.init_args.batch_kind", compute_fn=lambda m: m.batch_kind, apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        # Keys named by api_key_env in a YAML (not only on the command line) are masked in the output.
        add_secrets(secrets_in_config(self.config.as_dict()))

    def instantiate_trainer(self, **kwargs):
        # Checkpoint files (unless the config chose its own plugin) and sharded folders written atomically.
        return use_atomic_folders(use_atomic_checkpoints(super().instantiate_trainer(**kwargs)))

    def before_fit(self) -> None:
        if self.config.fit.overwrite_export:
            for callback in self.trainer.callbacks:
                if isinstance(callback, ExportCallback):
                    callback.overwrite = True
        configured = self.config.fit.trainer.callbacks or []
        configured = configured if isinstance(configured, list) else [configured]
        bar = self.trainer.progress_bar_callback
        if type(bar) is RichProgressBar and not any(str(c.class_path).endswith("RichProgressBar") for c in configured):
            # Lightning's default bar (none was configured): the same bar, with a right epoch display.
            self.trainer.callbacks[self.trainer.callbacks.index(bar)] = EpochProgressBar()


def quiet_handled_warnings() -> None:
    """Silence the warnings every run printed that this project has dealt with (each says why)."""
    # GRPOModule steps its optimizer inside training_step (manual optimisation), so ModelCheckpoint's
    # every_n_train_steps save holds the weights after that step: the state a resumed fit must start
    # from (tests/test_resume.py). Lightning's long warning proposes keeping the state before the step.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) still builds torch's
    # deprecated LeafSpec; nothing here calls it directly, and the value it builds is unchanged.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class _Parsed(Exception):  # noqa: N818  (not an error: carries the parsed config out of LightningCLI's __init__)
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnlyCLI(PathVLMCLI):
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(yaml.safe_load(parser.dump(self.config, skip_validation=True, skip_none=False)))


def expand_bases(args: list[str]) -> list[str]:
    """``args`` with every ``--config FILE`` preceded by the ``--config`` of its bases (recursively)."""
    if "--base" in args or any(a.startswith("--base=") for a in args):
        raise ConfigBaseError("--base is read from config files only; pass the base itself with --config")
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in _CONFIG_FLAGS and i + 1 < len(args):
            out += _spent(_with_bases(args[i + 1], ()))
            i += 2
            continue
        if args[i].startswith("--config="):
            out += _spent(_with_bases(args[i].split("=", 1)[1], ()))
        else:
            following = args[i + 1] if i + 1 < len(args) else None
            legacy.check_flag(args[i], following)
            legacy_parts.check_flag(args[i], following)
            out.append(args[i])
        i += 1
    return out


def _spent(configs: list[str]) -> list[str]:
    """Once read, a config's ``base`` is cleared: the saved and printed config (already complete) must
    not name files relative to where it no longer is."""
    return configs if len(configs) == 2 else [*configs, "--base", "null"]


def _with_bases(path: str, chain: tuple[Path, ...]) -> list[str]:
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError):
        raw = None  # jsonargparse reads it next and reports the error with the file's name
    legacy.check_config(raw, path)
    legacy_parts.check_config(raw, path)
    bases = raw.get("base") if isinstance(raw, dict) else None
    if bases is None:
        return ["--config", path]
    if file.resolve() in chain:
        raise ConfigBaseError(f"{path}: its bases lead back to it ({' -> '.join(map(str, chain))})")
    out: list[str] = []
    for base in [bases] if isinstance(bases, str) else bases:
        target = file.parent / str(base)
        if not target.is_file():
            raise ConfigBaseError(f"{path}: base {base!r} does not exist (looked for {target})")
        out += _with_bases(str(target), (*chain, file.resolve()))
    return [*out, "--config", path]


def _cli(cls: type[PathVLMCLI], args: list[str] | None, run: bool, **parser_kwargs: Any) -> PathVLMCLI:
    import pathvlm_lightning.data  # noqa: F401
    import pathvlm_lightning.modules  # noqa: F401  (registers the modules for class_path shorthands)

    quiet_handled_warnings()
    # Field docstrings of config dataclasses (e.g. JudgeConfig) become their --help text. A config's
    # ${run_dir} names the top of that file, which under a subcommand (fit, test) is one level down:
    # jsonargparse rewrites such references relative to where they stand when it loads the file.
    set_parsing_settings(docstring_parse_attribute_docstrings=True, omegaconf_absolute_to_relative_paths=True)
    level, given = pop_log_level(sys.argv[1:] if args is None else args)
    configure_logging(level)
    expanded = expand_bases(given)
    with warnings.catch_warnings():
        # LightningCLI warns when args are given while sys.argv holds others: the expanded bases differ on purpose.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return cls(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=expanded,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf+", **parser_kwargs},
        )


def main(args: list[str] | None = None, run: bool = True) -> PathVLMCLI:
    """Entry point; ``args`` lets tests and scripts call the CLI in-process."""
    return _cli(PathVLMCLI, args, run)


def parse_config(args: list[str]) -> dict[str, Any]:
    """The config ``args`` (a subcommand's arguments, e.g. ``["--config", "configs/demo/grpo.yaml"]``)
    resolve to, as plain data: bases read, ``${...}`` resolved, defaults filled in; nothing is built.
    An invalid config raises ``jsonargparse.ArgumentError`` (or :class:`ConfigBaseError`)."""
    try:
        _cli(_ParseOnlyCLI, args, run=False, exit_on_error=False)
    except _Parsed as parsed:
        return parsed.config
    raise AssertionError("unreachable: _ParseOnlyCLI always raises _Parsed")
