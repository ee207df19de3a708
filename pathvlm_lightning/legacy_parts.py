"""Configs written before GRPOModule took its parts: the rollout, the rewards and the reference used to be
listed under ``trainer.callbacks``; they are now ``model.init_args.rollout``, ``.rewards`` (a list) and
``.reference``. Such a config (or flag) stops before anything is built, with a message that shows the
same settings in the new layout.

A part is recognised by its class: ``RolloutCallback``, ``ReferenceModelCallback`` or any
``RewardCallback`` subclass (the user rewards of the root ``callbacks/`` package included), imported
from its ``class_path``. A class that does not import is left for the config parser to report.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

import yaml

from pathvlm_lightning.callbacks.reference import ReferenceModelCallback
from pathvlm_lightning.callbacks.rewards import RewardCallback
from pathvlm_lightning.callbacks.sampler import RolloutCallback

_FLAG = "--trainer.callbacks"
_CLASS_PATH = re.compile(r"[A-Za-z_][\w.]*")


class LegacyPartsConfigError(ValueError):
    """A config or flag that lists a GRPO part under ``trainer.callbacks``; the message shows the new layout."""


def part_kind(class_path: Any) -> str | None:
    """``"rollout"``, ``"rewards"`` or ``"reference"`` for the class a ``class_path`` names, else None.

    >>> part_kind("pathvlm_lightning.callbacks.FormatReward"), part_kind("lightning.pytorch.callbacks.ModelCheckpoint")
    ('rewards', None)
    """
    cls = _import(str(class_path))
    if not inspect.isclass(cls):
        return None
    for kind, base in (("rollout", RolloutCallback), ("rewards", RewardCallback), ("reference", ReferenceModelCallback)):
        if issubclass(cls, base):
            return kind
    return None


def _import(class_path: str) -> Any:
    if "." not in class_path:  # a short name: the packaged parts only
        return importlib.import_module("pathvlm_lightning.callbacks").__dict__.get(class_path)
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001  (any import failure: the config parser reports it with the file's name)
        return None


def new_layout(parts: Mapping[str, list[Mapping[str, Any]]], append: bool = False) -> str:
    """The YAML that says what ``parts`` (kind -> the old callback entries) said, under ``model.init_args``."""
    init: dict[str, Any] = {}
    for kind in ("rollout", "rewards", "reference"):
        entries = [dict(e) for e in parts.get(kind, [])]
        if not entries:
            continue
        init[f"{kind}+" if kind == "rewards" and append else kind] = entries if kind == "rewards" else entries[-1]
    return yaml.safe_dump({"model": {"init_args": init}}, sort_keys=False).rstrip()


def _message(source: str, where: str, parts: Mapping[str, list[Mapping[str, Any]]], append: bool) -> str:
    listed = ", ".join(str(e.get("class_path")) for entries in parts.values() for e in entries)
    return (
        f"{source}: {where} lists {listed}. The rollout, the rewards and the reference are now given to the "
        "module (GRPOModule(backbone, rollout, rewards, reference, loss)), not listed under trainer.callbacks. "
        "Remove them from trainer.callbacks and write instead:\n"
        f"{new_layout(parts, append)}\n"
        "(rewards is a list; `rewards+:` in a stage file appends to its base's list. With beta 0 write "
        "reference: null.)"
    )


def _parts_of(entries: Any) -> dict[str, list[Mapping[str, Any]]]:
    found: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries if isinstance(entries, list) else [entries]:
        if isinstance(entry, Mapping):
            kind = part_kind(entry.get("class_path"))
            if kind is not None:
                found.setdefault(kind, []).append(entry)
    return found


def check_config(raw: Any, source: str) -> None:
    """Raise :class:`LegacyPartsConfigError` when the YAML mapping ``raw`` (read from ``source``) lists a
    GRPO part under ``trainer.callbacks`` (or ``callbacks+``, appended to a base's list)."""
    trainer = raw.get("trainer") if isinstance(raw, dict) else None
    if not isinstance(trainer, dict):
        return
    for key in ("callbacks", "callbacks+"):
        found = _parts_of(trainer.get(key))
        if found:
            raise LegacyPartsConfigError(_message(source, f"trainer.{key}", found, append=key.endswith("+")))


def check_flag(arg: str, value: str | None) -> None:
    """Raise :class:`LegacyPartsConfigError` for a ``--trainer.callbacks...`` flag that names a GRPO part
    (``--trainer.callbacks+=...FormatReward``, ``--trainer.callbacks.class_path ...``, a YAML list) or sets
    an argument only the parts have (``--trainer.callbacks.init_args.judge.base_url``)."""
    if not arg.startswith(_FLAG):
        return
    key, equals, inline = arg.partition("=")
    if key.endswith(".help"):  # --trainer.callbacks.help <class>: jsonargparse's help for any callback class
        return
    given = inline if equals else value
    if key.startswith(f"{_FLAG}.init_args."):
        name = key[len(f"{_FLAG}.init_args."):].split(".", 1)[0]
        if name in _part_only_arguments():
            raise LegacyPartsConfigError(
                f"the flag {key}: `{name}` is an argument of a GRPO part, and the parts are now given to the module. "
                f"Write --model.init_args.rewards.init_args.{key[len(f'{_FLAG}.init_args.'):]} for the last reward "
                "(or .rollout / .reference for those)"
            )
        return
    if given is None:
        return
    try:
        parsed = yaml.safe_load(given)
    except yaml.YAMLError:
        parsed = given
    entries = parsed if isinstance(parsed, list) else [parsed]
    nodes = [e if isinstance(e, Mapping) else {"class_path": e} for e in entries if isinstance(e, (Mapping, str))]
    found = _parts_of(nodes)
    if found:
        flag = {"rollout": "--model.init_args.rollout", "rewards": "--model.init_args.rewards+", "reference": "--model.init_args.reference"}
        hint = ", ".join(f"{flag[kind]}={e.get('class_path')}" for kind, es in found.items() for e in es)
        raise LegacyPartsConfigError(_message(f"the flag {arg}", "it", found, append=True) + f"\nAs a flag: {hint}")


def _part_only_arguments() -> set[str]:
    """Constructor arguments of the packaged parts that no Lightning callback in our configs takes."""
    import pathvlm_lightning.callbacks as packaged

    names: set[str] = set()
    for cls in vars(packaged).values():
        if inspect.isclass(cls) and issubclass(cls, (RolloutCallback, RewardCallback, ReferenceModelCallback)):
            names |= set(inspect.signature(cls.__init__).parameters) - {"self"}
    return names - {"name", "weight"}
