"""Reading a stage's LightningCLI config as plain data, without building anything.

The pipeline plan (which folders a stage writes, which model it starts from), the export command and
the model card all look into the same config; these helpers are the one place that knows its shape
(``class_path``/``init_args`` nodes, ``trainer.callbacks`` as a list or a single node). A stage file
is read as the CLI reads it (:func:`pathvlm_lightning.cli.parse_config`): its ``base:`` files
first, ``${run_dir}`` resolved, defaults filled in, so what is read here is what a fit runs with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class StageConfigError(ValueError):
    """A file that is not a readable stage config; the message names it."""


def read_stage_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved config of the stage file ``path`` (plus CLI ``overrides``) as a dict with a ``model`` section."""
    from jsonargparse import ArgumentError
    from omegaconf.errors import OmegaConfBaseException

    from pathvlm_lightning.cli import ConfigBaseError, parse_config
    from pathvlm_lightning.grpo.losses.legacy import LegacyLossConfigError
    from pathvlm_lightning.legacy_parts import LegacyPartsConfigError

    if not Path(path).is_file():
        raise StageConfigError(f"{path}: no such stage config")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise StageConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise StageConfigError(f"{path}: not a stage config (a YAML mapping)")
    try:
        config = parse_config(["--config", str(path), *overrides])
    except (ArgumentError, ConfigBaseError, OmegaConfBaseException) as error:
        raise StageConfigError(f"{path}: not a valid stage config: {error}") from None
    except (LegacyLossConfigError, LegacyPartsConfigError) as error:  # an older layout: the message shows the new one
        raise StageConfigError(str(error)) from None
    if not isinstance(config.get("model"), Mapping):
        raise StageConfigError(f"{path}: not a stage config (it and its bases set no 'model' section)")
    return config


def init_args(node: Any) -> dict[str, Any]:
    """``init_args`` of a ``class_path`` node (or the node itself when it is plain arguments)."""
    if not isinstance(node, Mapping):
        return {}
    return dict(node.get("init_args") or {}) if "class_path" in node else dict(node)


def short_name(class_path: Any) -> str:
    """``"pathvlm_lightning.modules.GRPOModule"`` -> ``"GRPOModule"``."""
    return str(class_path).rsplit(".", 1)[-1]


def start_model(config: Mapping[str, Any]) -> str | None:
    """``model.init_args.backbone.init_args.model``: the folder or name the stage starts from."""
    value = init_args(init_args(config.get("model")).get("backbone")).get("model")
    return None if value is None else str(value)


#: ``model.init_args`` keys of a GRPO stage's parts (GRPOModule's rollout, rewards and reference)
PART_KEYS = ("rollout", "rewards", "reference")


def grpo_parts(config: Mapping[str, Any]) -> dict[str, Any]:
    """The GRPO parts a resolved config sets: ``model.init_args`` key -> its ``class_path`` node (a list
    of them for ``rewards``); keys that are unset or null are left out (an SFT stage has none)."""
    module = init_args(config.get("model"))
    return {key: module[key] for key in PART_KEYS if module.get(key)}


def part_nodes(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every GRPO part of a resolved config as one list of ``class_path`` nodes (rollout, rewards, reference)."""
    nodes: list[Mapping[str, Any]] = []
    for value in grpo_parts(config).values():
        nodes += [n for n in (value if isinstance(value, list) else [value]) if isinstance(n, Mapping)]
    return nodes


def callbacks(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``trainer.callbacks`` as a list of ``class_path`` nodes (a single node or none is allowed)."""
    listed = (config.get("trainer") or {}).get("callbacks") or []
    return [c for c in (listed if isinstance(listed, list) else [listed]) if isinstance(c, Mapping)]
