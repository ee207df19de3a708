"""Every way ``token_logprobs`` can end up slower than the configuration allows is said once at WARNING,
with the reason and the cost, and the mode in use is readable (``Backbone.last_sharing_mode``) and logged.

The fast way: ``cache`` for image prompts in one process without checkpointing a training forward,
else ``grouped`` (``backbone/shared_prompt.py``). Each case below takes away what one mode needs:
a cache argument (transformers without one), a block-mask attention backend (flash-attention),
a family whose layers all attend (Qwen3.5), ``mm_encoder_outputs`` (transformers 5.17).
"""

from __future__ import annotations

import doctest
import inspect
import logging

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from pathvlm_lightning import logs
from pathvlm_lightning.backbone import SHARING_MODE_CODES, Backbone, wrapper
from pathvlm_lightning.backbone.shared_prompt import _keeps_cache, choose_sharing
from pathvlm_lightning.cli import main
from tests.dist_worker import PREFIX_GENERATIONS, prefix_case
from tests.test_cli_configs import REPO, SMALL_DATA

LOGGER = "pathvlm_lightning.backbone.wrapper"


def _images_shareable(backbone) -> bool:
    return "mm_encoder_outputs" in inspect.signature(backbone.hf_model.forward).parameters


def _without(backbone, *arguments: str) -> None:
    """The model's forward as a transformers would have it whose forward takes none of ``arguments``."""
    original = backbone.hf_model.forward
    kept = [p for n, p in inspect.signature(original).parameters.items() if n not in arguments]

    def forward(*args, **kwargs):
        return original(*args, **kwargs)

    forward.__signature__ = inspect.Signature(kept)
    backbone.hf_model.forward = forward


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _score(backbone, inputs, completions) -> None:
    backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS).sum().backward()


def test_the_fast_way_says_nothing(tiny_backbone, tiny_processor, caplog):
    backbone = tiny_backbone(gradient_checkpointing=True)
    inputs, completions = prefix_case(tiny_processor, slice(0, 2))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _score(backbone, inputs, completions)  # checkpointing a training forward: grouped is the fast way
        assert backbone.last_sharing_mode == "grouped"
        backbone.eval()
        with torch.no_grad():
            backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)
        assert backbone.last_sharing_mode == "cache"
    assert _warnings(caplog) == []


def test_a_gradient_free_training_mode_pass_under_checkpointing(tiny_backbone, tiny_processor, caplog):
    # A reference pass in training mode: nothing is checkpointed without gradients. transformers 5.25
    # keeps the cache then; 5.17 drops it, so the pass is grouped there, and says why.
    backbone = tiny_backbone(gradient_checkpointing=True)
    inputs, completions = prefix_case(tiny_processor, slice(0, 2))
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        logps = backbone.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)
    assert torch.isfinite(logps).all()
    if _keeps_cache():
        assert backbone.last_sharing_mode == "cache" and _warnings(caplog) == []
    else:
        assert backbone.last_sharing_mode == "grouped"
        (message,) = _warnings(caplog)
        assert "drops the cache of a training-mode forward" in message


def test_prompts_not_shared_by_choice_is_not_a_fallback(tiny_backbone, tiny_processor, caplog):
    backbone = tiny_backbone(share_prompts=False)
    inputs, completions = prefix_case(tiny_processor, slice(0, 2))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _score(backbone, inputs, completions)
    assert backbone.last_sharing_mode == "none" and _warnings(caplog) == []


def test_no_cache_argument_groups_instead_and_says_so_once(tiny_backbone, tiny_processor, caplog):
    backbone = tiny_backbone()
    _without(backbone, "cache", "past_key_values")
    inputs, completions = prefix_case(tiny_processor, slice(0, 2))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            _score(backbone, inputs, completions)
    assert backbone.last_sharing_mode == "grouped"
    (message,) = _warnings(caplog)  # once, not per call
    assert "takes no key/value cache argument" in message and "Cost: attention runs over the grouped" in message


def test_flash_attention_under_checkpointing_shares_images_or_nothing(tiny_backbone, tiny_processor, caplog):
    backbone = tiny_backbone(gradient_checkpointing=True)
    inputs, _ = prefix_case(tiny_processor, slice(0, 2))
    backbone.hf_model.config.get_text_config()._attn_implementation = "flash_attention_2"
    backbone.train()
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.enable_grad():
        mode = backbone.sharing_mode(inputs)
    (message,) = _warnings(caplog)
    assert "'flash_attention_2' takes no block mask" in message
    assert "activation checkpointing drops the prompt's cache" in message
    if _images_shareable(backbone):  # transformers 5.2x
        assert mode == "images" and "prompt tokens run through every decoder layer G times" in message
    else:  # transformers 5.17: no mm_encoder_outputs either
        assert mode == "none" and "takes no mm_encoder_outputs" in message and "G full copies" in message


def test_no_mm_encoder_outputs_falls_back_to_copies(tiny_backbone, tiny_processor, caplog):
    backbone = tiny_backbone(gradient_checkpointing=True)
    _without(backbone, "mm_encoder_outputs")
    inputs, _ = prefix_case(tiny_processor, slice(0, 2))
    backbone.hf_model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.enable_grad():
        assert backbone.sharing_mode(inputs) == "none"
    (message,) = _warnings(caplog)
    assert "takes no mm_encoder_outputs" in message and "each prompt runs as G full copies" in message


def test_qwen3_5_under_fsdp2_runs_copies_and_says_why(tiny_backbone, caplog, monkeypatch):
    backbone = tiny_backbone(model="embedded-tiny-qwen3.5")
    processor = backbone.processor
    inputs, _ = prefix_case(processor, slice(0, 2))
    monkeypatch.setattr(wrapper.sharding, "fsdp_units", lambda model: [model])  # as if sharded
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert backbone.sharing_mode(inputs) == "none"
        assert backbone.sharing_mode(inputs) == "none"
    (message,) = _warnings(caplog)
    assert "Qwen3_5 cannot group" in message and "under FSDP2" in message and "G full copies" in message


def test_text_only_prompts_under_flash_attention_say_so(tiny_backbone, tiny_processor):
    backbone = tiny_backbone()
    inputs, _ = prefix_case(tiny_processor, slice(0, 2))
    text_only = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    backbone.hf_model.config.get_text_config()._attn_implementation = "flash_attention_2"
    sharing = choose_sharing(backbone.family, backbone.hf_model, text_only, share=True, sharded=False)
    assert sharing.mode == "none" and "text-only prompts are shared by grouping only" in sharing.fallback


def test_a_frozen_copy_does_not_repeat_a_warning(tiny_backbone, tiny_processor, caplog):
    backbone = tiny_backbone()
    _without(backbone, "cache", "past_key_values")
    reference = backbone.build_frozen_copy()
    _without(reference, "cache", "past_key_values")
    inputs, completions = prefix_case(tiny_processor, slice(0, 2))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _score(backbone, inputs, completions)
        with torch.no_grad():
            reference.token_logprobs(inputs, completions, num_generations=PREFIX_GENERATIONS)
    assert len(_warnings(caplog)) == 1


def test_the_attention_backend_transformers_runs_is_checked(monkeypatch, caplog):
    # A backend swapped at load time (transformers choosing another one) is said at WARNING.
    monkeypatch.setattr("transformers.PreTrainedModel.set_attn_implementation", lambda self, name: None)
    with caplog.at_level(logging.WARNING, logger="pathvlm_lightning.backbone.loading"):
        Backbone(attn_implementation="eager")
    assert any("'eager' was asked for, transformers runs 'sdpa'" in r.getMessage() for r in caplog.records)


def test_codes_are_ordered_from_copies_to_cache():
    # rollout/sharing_mode logs the lowest over ranks: a smaller number is a slower way.
    assert SHARING_MODE_CODES == {"none": 0, "images": 1, "grouped": 2, "cache": 3}


def test_a_grpo_fit_logs_the_sharing_mode(tmp_path):
    run_dir = tmp_path / "run"
    cli = main(
        [
            "fit", "--config", str(REPO / "configs/demo/grpo.yaml"), f"--run_dir={run_dir}",
            "--model.init_args.backbone.init_args.model=embedded-tiny", "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--model.init_args.skip_zero_advantage_steps=false",
            f"--data.init_args.split_dir={tmp_path / 'splits'}", *SMALL_DATA,
        ]  # fmt: skip
    )
    assert float(cli.trainer.callback_metrics["rollout/sharing_mode"]) == SHARING_MODE_CODES["cache"]
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert cli.trainer.logger.hparams["sharing_mode"] == "cache"


def test_log_level_flag_and_project_logging():
    # --log_level is taken out of the arguments wherever it stands (worked examples in logs.py); the
    # project's logger prints at that level while third-party loggers stay at WARNING.
    assert doctest.testmod(logs).failed == 0
    try:
        logs.configure_logging("DEBUG")
        assert logging.getLogger("pathvlm_lightning").level == logging.DEBUG
        assert logging.getLogger("transformers").level == logging.WARNING
        assert logging.getLogger("lightning.pytorch").level == logging.WARNING
    finally:
        logs.configure_logging("INFO")


def test_lightning_says_which_checkpoint_it_restored_and_nothing_else_at_info(caplog):
    # Lightning's rank-zero INFO lines are held back, except the ones that name a restored checkpoint:
    # a user resuming after a crash must see which one the run continued from.
    logs.configure_logging("INFO")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero.setLevel(logging.INFO)  # caplog.at_level resets it; configure_logging's level
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("Restored all states from the checkpoint at runs/x/checkpoints/last.ckpt")
        rank_zero.warning("The dataloader does not have many workers")
    assert [r.getMessage() for r in caplog.records] == [
        "Restored all states from the checkpoint at runs/x/checkpoints/last.ckpt",
        "The dataloader does not have many workers",
    ]
