"""One GRPO training step, ours vs TRL's ``GRPOTrainer``, side by side on the same model and data.

    pip install -e ".[bench]"          # TRL; best in a separate venv (see benchmarks/README.md)
    python benchmarks/grpo_vs_trl.py --model both --steps 5 --warmup 2 --threads 2 --output grpo_vs_trl.json
    python benchmarks/grpo_vs_trl.py --model tiny --vocab qwen --num-generations 8 --completion-length 256 \
        --gradient-checkpointing --steps 3 --warmup 1

Both sides start from one saved Qwen2.5-VL folder (embedded tiny or small architecture, fp32), train on
the same records (448x448 images: 256 image tokens each) in the same order, with G completions per
prompt forced to the same length, the same loss type, beta, clip range, learning rate and rule
rewards. Each side runs in its own child process (so its peak RSS is its own); the parent lets them
step in lockstep, one side at a time, alternating which goes first. Printed per model: median wall
and CPU seconds per optimizer step, completions per second, peak RSS during the steps, and ours/TRL
ratios (of the medians, and the median ratio of the back-to-back step pairs), and the compute floor:
the ratio of tokens through the decoder body when ours runs each prompt once per group and TRL G
times, ``(P + G*C) / (G*(P + C))`` for a P-token prompt and C-token completions (1 with
``--prompt-copies``). ``--vocab qwen`` gives both sides Qwen's real 151,936-row vocabulary. ``--sides ours`` runs our side
alone (for shapes TRL cannot run here in time or memory; the report then has no ratios).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from PIL import Image

from _settings import BenchSettings, read_records, write_records
from pathvlm_lightning.backbone.loading import VOCABS, load_model_and_processor
from pathvlm_lightning.data.synthetic import generate_dataset

HERE = Path(__file__).resolve().parent
SIDES = {"ours": HERE / "_our_step.py", "trl": HERE / "_trl_step.py"}
SIZES = ("tiny", "small")


# ---------------------------------------------------------------------------- preparation
def save_model(size: str, folder: Path, seed: int, vocab: str = "small") -> Path:
    """The embedded architecture with seeded random weights, saved once so both sides load the same bytes."""
    model, processor = load_model_and_processor(
        f"embedded-{size}", vocab=vocab, seed=seed, dtype="float32", attn_implementation="sdpa",
        quantization=None, min_pixels=None, max_pixels=None,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_records(folder: Path, count: int, image_size: int, seed: int) -> Path:
    """``count`` synthetic tile questions whose 112x112 tiles are upscaled to ``image_size`` squares."""
    source = generate_dataset(folder / "tiles", count, seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for record in read_records(source):
        with Image.open(source.parent / record.image) as tile:
            big = tile.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
        path = folder / "images" / f"{record.id}.png"
        big.save(path)
        records.append(dataclasses.replace(record, image=str(path)))
    path = folder / "records.jsonl"
    write_records(records, path)
    return path


# ---------------------------------------------------------------------------- the lockstep run
@dataclasses.dataclass
class _Child:
    name: str
    process: subprocess.Popen
    reports: IO[str]
    log: Path

    def expect(self, event: str) -> dict[str, Any]:
        line = self.reports.readline()
        if not line:
            self.process.wait()
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{self.name} child exited (code {self.process.returncode}) before '{event}'; "
                               f"last lines of {self.log}:\n{tail}")
        message = json.loads(line)
        if message["event"] != event:
            raise RuntimeError(f"{self.name} child sent {message!r}, expected a '{event}' report")
        return message

    def go(self) -> dict[str, Any]:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self.expect("step")


def _start(name: str, settings_path: Path, log: Path, env: dict[str, str]) -> _Child:
    read_fd, write_fd = os.pipe()
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(SIDES[name]), "--settings", str(settings_path), "--report-fd", str(write_fd)],
            stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            env=env, text=True, cwd=HERE,
        )
    os.close(write_fd)
    return _Child(name, process, os.fdopen(read_fd), log)


def run_lockstep(
    settings: BenchSettings, workdir: Path, sides: tuple[str, ...] = tuple(SIDES)
) -> dict[str, dict[str, Any]]:
    """Both children loaded, then step k of each side run alone, ours first on even k, TRL first on odd k."""
    settings_path = workdir / "settings.json"
    settings.save(settings_path)
    threads = str(settings.threads)
    # Passive OpenMP waiting: on a machine with more runnable threads than cores, spinning workers wait on
    # descheduled peers and a step can take 10-20x longer (seen on a shared 2-core machine). Export
    # OMP_WAIT_POLICY=ACTIVE to measure with spinning.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    children = [_start(name, settings_path, workdir / f"{name}.log", env) for name in sides]
    try:
        results = {child.name: {"ready": child.expect("ready"), "seconds": [], "cpu_seconds": []} for child in children}
        for step in range(settings.total_steps):
            for child in children if step % 2 == 0 else children[::-1]:
                report = child.go()
                results[child.name]["seconds"].append(report["seconds"])
                results[child.name]["cpu_seconds"].append(report["cpu_seconds"])
        for child in children:
            results[child.name]["done"] = child.expect("done")
            if child.process.wait() != 0:
                raise RuntimeError(f"{child.name} child failed with code {child.process.returncode}; see {child.log}")
    finally:
        for child in children:
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
    return results


def summarize(raw: dict[str, dict[str, Any]], settings: BenchSettings, warmup: int) -> dict[str, Any]:
    """Medians over the measured steps; ratios ours/TRL of the medians and of each step pair."""
    sides = {}
    for name, result in raw.items():
        measured = result["seconds"][warmup:]
        median = statistics.median(measured)
        done = result["done"]
        sides[name] = {
            "seconds_per_step": median,
            "seconds_min": min(measured),
            "seconds_max": max(measured),
            "cpu_seconds_per_step": statistics.median(result["cpu_seconds"][warmup:]),
            "completions_per_second": settings.completions_per_step / median,
            "peak_rss_mib": done["peak_rss_mib"],
            "peak_growth_mib": done["peak_growth_mib"],
            "rss_before_steps_mib": result["ready"]["rss_mib"],
            "process_max_rss_mib": done["process_max_rss_mib"],
            "parameters": result["ready"]["parameters"],
            "trainable_parameters": result["ready"]["trainable"],
            "completion_length_mean": done["completion_length_mean"],
            "step_seconds_all": result["seconds"],
            "step_cpu_seconds_all": result["cpu_seconds"],
        }
        if "prompt_tokens" in done:
            sides[name]["prompt_tokens"] = done["prompt_tokens"]
    if "trl" not in sides:
        return {"sides": sides, "ratios_ours_over_trl": None}
    ours, trl = sides["ours"], sides["trl"]
    keys = ("seconds_per_step", "cpu_seconds_per_step", "completions_per_second", "peak_rss_mib", "peak_growth_mib")
    ratios = {key: ours[key] / trl[key] for key in keys}
    # Step k of both sides ran back to back, under about the same outside load.
    pairs = [o / t for o, t in zip(raw["ours"]["seconds"][warmup:], raw["trl"]["seconds"][warmup:])]
    ratios["paired_seconds_median"] = statistics.median(pairs)
    ratios["paired_seconds_range"] = [min(pairs), max(pairs)]
    ratios["compute_floor"] = compute_floor(ours.get("prompt_tokens"), settings)
    return {"sides": sides, "ratios_ours_over_trl": ratios}


def compute_floor(prompt_tokens: int | None, settings: BenchSettings) -> float | None:
    """Decoder-body tokens ours/TRL: one prompt pass per group ``(P + G*C)`` against G copies ``G*(P + C)``.

    >>> round(compute_floor(367, BenchSettings("m", "r", 1, 1, num_generations=8, completion_length=256)), 3)
    0.485
    """
    if prompt_tokens is None:
        return None
    if not settings.share_prompts:
        return 1.0
    p, g, c = prompt_tokens, settings.num_generations, settings.completion_length
    return (p + g * c) / (g * (p + c))


def render(model: str, summary: dict[str, Any], settings: BenchSettings, warmup: int, steps: int) -> str:
    ours, ratio = summary["sides"]["ours"], summary["ratios_ours_over_trl"]
    trl = summary["sides"].get("trl")
    seen = f"ours {ours['completion_length_mean']:.0f}"
    if trl is not None:
        seen += f", TRL {trl['completion_length_mean']:.0f}"
    rows = [
        ("s/step (median)", "seconds_per_step", "{:.3f}"),
        ("CPU s/step (median)", "cpu_seconds_per_step", "{:.3f}"),
        ("completions/s", "completions_per_second", "{:.2f}"),
        ("peak RSS in steps, MiB", "peak_rss_mib", "{:.0f}"),
        ("peak growth in steps, MiB", "peak_growth_mib", "{:.0f}"),
    ]
    head = (f"model {model} ({ours['parameters'] / 1e6:.2f} M params, {ours['trainable_parameters'] / 1e6:.2f} M "
            f"trained), fp32, {settings.vocab} vocabulary, "
            f"{'activation checkpointing, ' if settings.gradient_checkpointing else ''}"
            f"G={settings.num_generations}, {settings.prompts_per_step} prompts x "
            f"{settings.num_generations} completions, {settings.completion_length} completion tokens "
            f"(mean seen: {seen}), "
            f"prompt {ours.get('prompt_tokens', '?')} tokens, beta {settings.beta}, loss {settings.loss_type}, "
            f"{settings.threads} threads, median of {steps} steps after {warmup} warmup; ours "
            f"{'shares each prompt among' if settings.share_prompts else 'runs G copies of each prompt for'} "
            f"its G completions, TRL runs G copies")
    if trl is None:
        lines = [head.replace(", TRL runs G copies", "; TRL not run"), f"{'':28}{'ours':>10}"]
        lines += [f"{label:28}{fmt.format(ours[key]):>10}" for label, key, fmt in rows]
        floor = compute_floor(ours.get("prompt_tokens"), settings)
        if floor is not None:
            lines.append(f"compute floor against G prompt copies, (P + G*C) / (G*(P + C)): {floor:.2f}")
        return "\n".join(lines)
    lines = [head, f"{'':28}{'ours':>10}{'TRL':>10}{'ours/TRL':>10}"]
    for label, key, fmt in rows:
        lines.append(f"{label:28}{fmt.format(ours[key]):>10}{fmt.format(trl[key]):>10}{ratio[key]:>10.2f}")
    low, high = ratio["paired_seconds_range"]
    lines.append(f"step pairs, wall ours/TRL: median {ratio['paired_seconds_median']:.2f} (range {low:.2f}-{high:.2f})")
    floor = ratio["compute_floor"]
    if floor is not None:
        lines.append(f"compute floor (decoder tokens ours/TRL, (P + G*C) / (G*(P + C))): {floor:.2f}")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {pkg: _version(pkg) for pkg in ("torch", "transformers", "trl", "lightning")}
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=(*SIZES, "both"), default="both")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side before them")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    parser.add_argument("--image-size", type=int, default=448, help="square image side (448: 256 image tokens)")
    parser.add_argument("--completion-length", type=int, default=64, help="forced completion tokens")
    parser.add_argument("--num-generations", type=int, default=4, help="G, completions per prompt")
    parser.add_argument("--vocab", choices=VOCABS, default="small",
                        help="embedded tokenizer: small (1,024 ids) or qwen (Qwen2.5-VL's 151,936 rows)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing (non-reentrant) on both sides")
    parser.add_argument("--prompt-copies", action="store_true",
                        help="our side runs G copies of each prompt (Backbone(share_prompts=False)), as TRL does")
    parser.add_argument("--sides", choices=("both", "ours"), default="both",
                        help="ours: our side alone (no TRL import, no ratios), for shapes TRL cannot run here")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.num_generations < 2:
        parser.error(
            f"need --steps >= 1, --warmup >= 0, --threads >= 1, --num-generations >= 2; got {args.steps}, "
            f"{args.warmup}, {args.threads}, {args.num_generations}"
        )
    sides = tuple(SIDES) if args.sides == "both" else ("ours",)
    if "trl" in sides and importlib.util.find_spec("trl") is None:
        raise SystemExit(f"{sys.executable} cannot import trl: install the bench extra (pip install -e '.[bench]')")
    report: dict[str, Any] = {"machine": _machine(), "models": {}}
    sizes = SIZES if args.model == "both" else (args.model,)
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl.") as tmp:
        for size in sizes:
            workdir = Path(tmp) / size
            workdir.mkdir()
            settings = BenchSettings(
                model_dir=str(workdir / "model"),
                records_path=str(workdir / "data" / "records.jsonl"),
                total_steps=args.warmup + args.steps,
                threads=args.threads,
                num_generations=args.num_generations,
                completion_length=args.completion_length,
                share_prompts=not args.prompt_copies,
                vocab=args.vocab,
                gradient_checkpointing=args.gradient_checkpointing,
            )
            save_model(size, Path(settings.model_dir), settings.seed, args.vocab)
            # New prompts every step and no epoch boundary inside the run.
            count = settings.prompts_per_step * settings.total_steps
            make_records(workdir / "data", count, args.image_size, settings.seed)
            summary = summarize(run_lockstep(settings, workdir, sides), settings, args.warmup)
            print(render(size, summary, settings, args.warmup, args.steps), flush=True)
            print(flush=True)
            report["models"][size] = {"settings": dataclasses.asdict(settings), **summary}
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
          f"{', '.join(f'{k} {v}' for k, v in report['machine']['versions'].items())}; {report['machine']['date']}")


if __name__ == "__main__":
    main()
