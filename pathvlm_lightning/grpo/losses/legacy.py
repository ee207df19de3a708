"""Configs written before the loss became a class: ``model.init_args.loss_type`` (and ``beta``,
``epsilon_low``, ``epsilon_high``) now live under ``model.init_args.loss``; such a config stops with
a message that shows the same settings in the new layout."""

from __future__ import annotations

from typing import Any

LEGACY_KEYS = ("loss_type", "beta", "epsilon_low", "epsilon_high")
_FLAG = "--model.init_args."


class LegacyLossConfigError(ValueError):
    """A config that sets the loss on the module; the message shows the new layout."""


def new_layout(settings: dict[str, Any]) -> str:
    """The YAML that says what ``settings`` (old module keys) said, under ``model.init_args.loss``."""
    args = {("aggregation" if key == "loss_type" else key): value for key, value in settings.items()}
    lines = [
        "model:",
        "  init_args:",
        "    loss:",
        "      class_path: pathvlm_lightning.grpo.losses.GRPOLoss",
        "      init_args:",
    ]
    lines += [f"        {key}: {value}" for key, value in args.items()] or ["        {}"]
    return "\n".join(lines)


def _message(source: str, settings: dict[str, Any]) -> str:
    return (
        f"{source}: model.init_args sets {', '.join(settings)}, the loss's own settings since the loss became a "
        "class (loss_type is now GRPOLoss's aggregation). Write instead:\n"
        f"{new_layout(settings)}\n(GSPOLoss, CISPOLoss and SAPOLoss take the same place; see grpo/losses/.)"
    )


def check_config(raw: Any, source: str) -> None:
    """Raise :class:`LegacyLossConfigError` when the YAML mapping ``raw`` (read from ``source``) sets a
    legacy loss key on the model."""
    model = raw.get("model") if isinstance(raw, dict) else None
    init = model.get("init_args") if isinstance(model, dict) else None
    if isinstance(init, dict):
        found = {key: init[key] for key in LEGACY_KEYS if key in init}
        if found:
            raise LegacyLossConfigError(_message(source, found))


def check_flag(arg: str, value: str | None) -> None:
    """Raise :class:`LegacyLossConfigError` for a command-line flag ``--model.init_args.<legacy key>``."""
    if not arg.startswith(_FLAG):
        return
    key, _, inline = arg[len(_FLAG):].partition("=")
    if key in LEGACY_KEYS:
        raise LegacyLossConfigError(_message(f"the flag {arg}", {key: inline or value}))
