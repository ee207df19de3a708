"""``python -m pathvlm_lightning {fit,validate,test,predict} --config X.yaml``.

Model and data are LightningCLI subclass groups (``class_path``/``init_args``). The data module gets
its processor and batch kind from the model once both exist, so a YAML names the checkpoint once.
"""

from __future__ import annotations

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from pathvlm_lightning.checkpoint_io import use_atomic_checkpoints
from pathvlm_lightning.redact import add_secrets, secrets_in_config


class PathVLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
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
        # Checkpoint files written atomically unless the config chose its own checkpoint plugin.
        return use_atomic_checkpoints(super().instantiate_trainer(**kwargs))


def main(args: list[str] | None = None, run: bool = True) -> PathVLMCLI:
    """Entry point; ``args`` lets tests and scripts call the CLI in-process."""
    import pathvlm_lightning.modules  # noqa: F401  (registers the modules for class_path shorthands)
    import pathvlm_lightning.data  # noqa: F401

    # Field docstrings of config dataclasses (e.g. JudgeConfig) become their --help text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return PathVLMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )
