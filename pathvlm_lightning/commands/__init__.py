"""Commands beside LightningCLI's ``fit/validate/test/predict``: ``infer``, ``export``, ``pipeline``.

``python -m pathvlm_lightning infer ...`` answers one question with a trained model;
``python -m pathvlm_lightning export ...`` turns a stage's Lightning checkpoint into a folder plain
transformers loads, with a model card; ``python -m pathvlm_lightning pipeline --plan ...`` runs a
staged plan (:mod:`pathvlm_lightning.pipeline`). Each command module is imported only when it runs, so the
LightningCLI path pays nothing for them.
"""

from __future__ import annotations

import importlib

#: command name -> module with a ``main(argv: list[str]) -> int``
COMMANDS: dict[str, str] = {
    "infer": "pathvlm_lightning.commands.infer",
    "export": "pathvlm_lightning.commands.export",
    "pipeline": "pathvlm_lightning.pipeline.__main__",
}


def dispatch(argv: list[str]) -> int | None:
    """Run the command ``argv[0]`` names and return its exit code; ``None`` when ``argv`` is not one
    of :data:`COMMANDS` (it is then LightningCLI's to parse)."""
    if not argv or argv[0] not in COMMANDS:
        return None
    command = importlib.import_module(COMMANDS[argv[0]])
    return command.main(argv[1:])
