"""``python -m pathvlm_lightning infer``: answer one multiple-choice question about one image.

    python -m pathvlm_lightning infer --model runs/demo/sft/export --image tile.png \\
        --question "How large are the nuclei?" --options "A) small" "B) medium" "C) large"
    python -m pathvlm_lightning infer --checkpoint runs/sft/checkpoints/last.ckpt --config configs/sft.yaml \\
        --image tile.png --question "..." --options "A) ..." "B) ..." --json

The model sees exactly what evaluation shows it (the prompt of ``data/prompt.py``, rendered and
encoded by the same ``PromptCollator``), decodes greedily unless ``--sample``, and the answer is
read with the evaluation's rules (``rewards/answer.py``), so what this prints is what a test run
would have scored. Bad input (no image, fewer than two options, an option not written
``A) text``) exits with status 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pathvlm_lightning.data.validation import MIN_OPTIONS, InvalidRecord, check_image
from pathvlm_lightning.rewards.answer import resolve_choice
from pathvlm_lightning.rewards.completion import parse_completion

_THINK = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Answer:
    """One generated answer, read the way evaluation reads it."""

    completion: str  # the generated text, special tokens removed
    reasoning: str | None  # inside the first <think>...</think>; None without one
    letter: str | None  # the option the answer commits to (evaluation's rule); None if it commits to none
    text: str | None  # that option's text
    raw_answer: str | None  # the content of the final <answer> block, as written
    format_ok: bool  # the format reward's verdict
    output_tokens: int
    truncated: bool  # stopped by --max-new-tokens before an end-of-turn token


def parse_option_args(lines: list[str]) -> dict[str, str]:
    """``["A) red", "B) blue"]`` -> ``{"A": "red", "B": "blue"}``; raises ``ValueError`` unless
    there are at least two, each written ``X) text``, lettered A, B, C, ... in order.

    >>> parse_option_args(["A) red", "B. blue"])
    {'A': 'red', 'B': 'blue'}
    """
    from pathvlm_lightning.data.loaders import OPTION_LETTERS, parse_option_lines

    if len(lines) < MIN_OPTIONS:
        raise ValueError(f"give at least {MIN_OPTIONS} options, got {len(lines)}: {lines!r}")
    try:
        options = parse_option_lines(lines)
    except InvalidRecord as problem:
        raise ValueError(problem.detail) from None
    letters = list(options)
    if letters != list(OPTION_LETTERS[: len(letters)]) or list(map(_letter, lines)) != letters:
        raise ValueError(f"options must be lettered {', '.join(OPTION_LETTERS[: len(lines)])} in order, got {lines!r}")
    empty = [letter for letter, text in options.items() if not text]
    if empty:
        raise ValueError(f"option(s) {empty} have no text: {lines!r}")
    return options


def _letter(line: str) -> str:
    return line.strip().lstrip("(")[:1].upper()


def read_completion(completion: str, options: Mapping[str, str], output_tokens: int, truncated: bool) -> Answer:
    """Reasoning, chosen option and format verdict of ``completion`` (pure; no model).

    >>> a = read_completion("<think>Pink.</think><answer>A) H&E</answer>", {"A": "H&E", "B": "IHC"}, 9, False)
    >>> (a.reasoning, a.letter, a.text, a.format_ok)
    ('Pink.', 'A', 'H&E', True)
    """
    read = parse_completion(completion, options)
    parsed = read.answer
    letter = resolve_choice(parsed, options)
    think = _THINK.search(completion)  # shown as written: the first block only, none without one
    return Answer(
        completion=completion,
        reasoning=think.group(1).strip() if think else None,
        letter=letter,
        text=options[letter] if letter is not None else None,
        raw_answer=parsed.raw,
        format_ok=read.well_formed,
        output_tokens=output_tokens,
        truncated=truncated,
    )


def answer_question(
    backbone: Any,
    image: str | Path,
    question: str,
    options: Mapping[str, str],
    *,
    max_new_tokens: int = 128,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Answer:
    """Generate one answer with ``backbone`` (a :class:`~pathvlm_lightning.backbone.Backbone`)."""
    import torch

    from pathvlm_lightning.backbone.decoding import decode_completions
    from pathvlm_lightning.data.collate import PromptCollator
    from pathvlm_lightning.data.records import VQARecord

    # The record's answer is never shown to the model (the prompt holds question and options only);
    # the first letter fills the required field.
    first = next(iter(options))
    record = VQARecord(id="infer", image=str(image), question=question, options=dict(options), answer=first)
    batch = PromptCollator(backbone.processor)([record])
    if sample:
        torch.manual_seed(seed)
    ids = backbone.generate(
        batch["prompt_inputs"],
        num_generations=1,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
    )  # [1, L]
    mask, truncated = backbone.completion_mask(ids)
    (text,) = decode_completions(backbone.processor, ids, mask)
    return read_completion(text, options, int(mask.sum()), bool(truncated[0]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pathvlm_lightning infer",
        description="Answer one multiple-choice question about one image with a trained model.",
    )
    source = parser.add_argument_group("model (either --model, or --checkpoint with --config)")
    source.add_argument("--model", help="exported folder (or embedded-tiny / a hub id)")
    source.add_argument("--checkpoint", help="Lightning checkpoint (.ckpt) of a stage")
    source.add_argument("--config", help="the stage YAML the checkpoint was trained with")
    source.add_argument("--base-model", help="with --checkpoint: replaces the config's backbone.model")
    source.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: float32 with --model, the config's with --checkpoint)",
    )
    source.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    question = parser.add_argument_group("question")
    question.add_argument("--image", required=True, help="image file")
    question.add_argument("--question", required=True, help="question text")
    question.add_argument("--options", nargs="+", required=True, metavar="'X) text'", help="options, e.g. 'A) small'")
    decoding = parser.add_argument_group("decoding (greedy unless --sample)")
    decoding.add_argument("--max-new-tokens", type=int, default=128)
    decoding.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    decoding.add_argument("--temperature", type=float, help="with --sample (default 1.0)")
    decoding.add_argument("--top-p", type=float, help="with --sample (default 1.0)")
    decoding.add_argument("--seed", type=int, help="with --sample (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """Every input check that needs no model; returns the options. Fails through ``parser.error`` (status 2)."""
    if (args.model is None) == (args.checkpoint is None):
        parser.error("give either --model DIR or --checkpoint X.ckpt --config stage.yaml")
    if args.checkpoint is not None and args.config is None:
        parser.error("--checkpoint needs --config, the stage YAML it was trained with")
    if args.model is not None and (args.config is not None or args.base_model is not None):
        parser.error("--config and --base-model go with --checkpoint, not --model")
    for flag in ("checkpoint", "config"):
        value = getattr(args, flag)
        if value is not None and not Path(value).exists():
            parser.error(f"--{flag}: {value!r} does not exist")
    try:
        check_image(args.image)
    except InvalidRecord as problem:
        parser.error(f"--image: {problem.detail}")
    if not args.question.strip():
        parser.error("--question is empty")
    try:
        options = parse_option_args(args.options)
    except ValueError as problem:
        parser.error(f"--options: {problem}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = ("temperature", "top_p", "seed")
    given = [f"--{name.replace('_', '-')}" for name in sampling if getattr(args, name) is not None]
    if given and not args.sample:
        parser.error(f"{', '.join(given)} only apply with --sample (decoding is greedy otherwise)")
    if args.temperature is not None and args.temperature <= 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return options


def load_backbone(args: argparse.Namespace) -> Any:
    """The backbone named by ``--model``, or the one inside ``--checkpoint`` built from ``--config``."""
    import torch

    if args.model is not None:
        from pathvlm_lightning.backbone import Backbone

        backbone = Backbone(model=args.model, dtype=args.dtype or "float32")
    else:
        from pathvlm_lightning.commands.checkpoint import load_stage_module

        module = load_stage_module(args.config, args.checkpoint, base_model=args.base_model, dtype=args.dtype)
        backbone = module.backbone
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return backbone.to(device).eval()


def format_answer(answer: Answer) -> str:
    """The text report: reasoning, then the chosen option (and the raw completion when none was chosen)."""
    reasoning = answer.reasoning if answer.reasoning is not None else "(none: the completion has no <think> block)"
    lines = [f"Reasoning: {reasoning}"]
    if answer.letter is not None:
        lines.append(f"Answer: {answer.letter}) {answer.text}")
    else:
        why = (
            "no <answer> block"
            if answer.raw_answer is None
            else f"<answer>{answer.raw_answer}</answer> names no single option"
        )
        lines += [f"Answer: none ({why})", f"Completion: {answer.completion!r}"]
    if answer.truncated:
        lines.append(f"(stopped at --max-new-tokens after {answer.output_tokens} tokens)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = _check_args(parser, args)
    try:
        backbone = load_backbone(args)
    except (OSError, ValueError) as error:  # a missing folder, a checkpoint that does not fit the config
        print(f"error: cannot load the model: {error}", file=sys.stderr)
        return 2
    answer = answer_question(
        backbone,
        args.image,
        args.question.strip(),
        options,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        seed=args.seed if args.seed is not None else 0,
    )
    if args.json:
        print(json.dumps({"question": args.question.strip(), "options": options, **asdict(answer)}, ensure_ascii=False))
    else:
        print(format_answer(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
