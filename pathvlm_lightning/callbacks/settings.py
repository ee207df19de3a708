"""The arguments a GRPO part (rollout, reward, reference) was built with, as YAML names them.

The module shows its whole objective in its saved hyperparameters (``hparams.yaml``, the
checkpoint) from :meth:`RecordsArguments.config`, whether the part came from a config or from
Python, and a user reward in the root ``callbacks/`` package gets this by subclassing
``RewardCallback``, with nothing to write.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any


class RecordsArguments:
    """Keeps the constructor's arguments (defaults filled in) of every instance of a subclass."""

    _init_arguments: dict[str, Any] | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> RecordsArguments:
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:  # copy and pickle create the object bare, then restore its __dict__; a wrong call
            return self  # fails in __init__ with Python's own message
        bound.apply_defaults()
        arguments: dict[str, Any] = {}
        for name, parameter in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(bound.arguments.get(name, {}))
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                arguments[name] = bound.arguments[name]
        self._init_arguments = arguments
        return self

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: this part as a config names it."""
        return {"class_path": class_path(type(self)), "init_args": plain(self._init_arguments or {})}


def class_path(cls: type) -> str:
    """The shortest import path of ``cls`` (``pathvlm_lightning.callbacks.X`` for the packaged parts)."""
    package = cls.__module__.rsplit(".", 1)[0]
    if package == "pathvlm_lightning.callbacks" and importlib.import_module(package).__dict__.get(cls.__name__) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def plain(value: Any) -> Any:
    """``value`` as YAML-safe data: dataclasses (a judge's settings) as mappings, parts by their config."""
    if isinstance(value, RecordsArguments):
        return value.config()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
