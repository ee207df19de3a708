"""PNG figures of the staged pipeline: accuracy by stage, and the GRPO stages' reward curves.

matplotlib and TensorBoard's event reader are imported inside the functions, so importing this
module (e.g. from the report command's ``--help``) costs nothing. Figures are drawn on their own
"Agg" canvas (never through pyplot's global state) at a fixed size (``PANEL_INCHES`` per panel, ``DPI``) so the same
report always gives the same image size, and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: width and height of one panel, in inches; panels sit side by side
PANEL_INCHES = (5.0, 4.0)
DPI = 100
#: what the GRPO module logs each step (``reward/<name>`` per reward callback, and the weighted total)
DEFAULT_REWARD_TAGS = ("reward/total_mean", "reward/accuracy", "reward/format")
_EVENT_FILE_MARK = "tfevents"


def plot_stage_accuracy(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Bars of test accuracy per stage with the report's interval as error bars; a second panel
    shows the mean out-of-domain accuracy of the stages that have one."""
    stages: Mapping[str, Mapping[str, Any]] = report["stages"]
    if not stages:
        raise ValueError("plot_stage_accuracy: the report has no stages")
    ood: Mapping[str, Mapping[str, Any]] = report.get("ood") or {}
    level = round(100 * (report.get("settings") or {}).get("level", 0.95))
    fig, axes = _figure(2 if ood else 1)

    names = list(stages)
    accuracy = [100 * stages[n]["accuracy"] for n in names]
    below = [100 * (stages[n]["accuracy"] - stages[n]["ci_low"]) for n in names]
    above = [100 * (stages[n]["ci_high"] - stages[n]["accuracy"]) for n in names]
    axes[0].bar(names, accuracy, yerr=[below, above], capsize=4, color="tab:blue")
    axes[0].set_title(f"Test accuracy ({level}% CI)")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(0, 100)
    if ood:
        ood_names = list(ood)
        axes[1].bar(ood_names, [100 * ood[n]["mean_accuracy"] for n in ood_names], color="tab:orange")
        axes[1].set_title("Out-of-domain accuracy (mean over modalities)")
        axes[1].set_ylabel("accuracy (%)")
        axes[1].set_ylim(0, 100)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path)


#: The counterfactual figure's bars per stage: (report column, legend label, colour).
COUNTERFACTUAL_BARS = (
    ("accuracy", "original", "tab:blue"),
    ("blank_accuracy", "blank image", "tab:gray"),
    ("swapped_accuracy", "swapped image", "tab:red"),
    ("no_image_accuracy", "no image", "tab:olive"),
    ("shuffled_accuracy", "shuffled options", "tab:purple"),
)


def plot_counterfactuals(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars per stage: accuracy on the original inputs and under each counterfactual the
    report has, with the report's intervals as whiskers; a second panel shows image reliance and
    option consistency. A model that looks at the image has its blue bar far above the red one."""
    section = report.get("counterfactual") or {}
    stages: Mapping[str, Mapping[str, Any]] = section.get("stages") or {}
    if not stages:
        raise ValueError("plot_counterfactuals: the report has no counterfactual evaluation")
    level = round(100 * (report.get("settings") or {}).get("level", 0.95))
    names = list(stages)
    bars = [bar for bar in COUNTERFACTUAL_BARS if any(stages[n].get(bar[0]) is not None for n in names)]
    fig, axes = _figure(2)
    width = 0.8 / len(bars)
    for k, (key, label, colour) in enumerate(bars):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(names))]
        _grouped(axes[0], xs, [stages[n] for n in names], key, width, label, colour)
    axes[0].set_title(f"Test accuracy under counterfactual inputs ({level}% CI)")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(0, 100)
    derived = [bar for bar in (("image_reliance", "image reliance", "tab:red"),
                               ("option_consistency", "option consistency", "tab:purple"))
               if any(stages[n].get(bar[0]) is not None for n in names)]
    for k, (key, label, colour) in enumerate(derived):
        xs = [i + (k - (len(derived) - 1) / 2) * 0.4 for i in range(len(names))]
        _grouped(axes[1], xs, [stages[n] for n in names], key, 0.4, label, colour)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_title("Image reliance and option consistency")
    axes[1].set_ylabel("points / %")
    axes[1].set_ylim(-100 if any((stages[n].get("image_reliance") or 0) < 0 for n in names) else 0, 100)
    for ax in axes:
        ax.set_xticks(range(len(names)), names)
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _grouped(ax: Any, xs: list[float], rows: list[Mapping[str, Any]], key: str, width: float, label: str, colour: str) -> None:
    values = [100 * (row.get(key) or 0.0) for row in rows]
    cis = [row.get("ci", {}).get(key) for row in rows]
    below = [v - 100 * ci[0] if ci else 0.0 for v, ci in zip(values, cis)]
    above = [100 * ci[1] - v if ci else 0.0 for v, ci in zip(values, cis)]
    ax.bar(xs, values, width=width, yerr=[below, above], capsize=2, color=colour, label=label)


def read_scalars(tb_dir: str | os.PathLike, tags: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Every logged point of ``tags`` in the TensorBoard event files anywhere under ``tb_dir``.

    Returns ``{tag: [(step, value), ...]}`` sorted by step, with every asked tag present (an empty
    list when no file has it). Several files (a resumed run writes a new one) are merged; where two
    points share a step, the one written last (latest wall time) wins, as a resumed run re-logs
    the steps after its checkpoint.
    """
    points: dict[str, dict[int, tuple[float, float]]] = {tag: {} for tag in tags}  # tag -> step -> (wall, value)
    for accumulator in _accumulators(tb_dir):
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag not in available:
                continue
            for event in accumulator.Scalars(tag):
                previous = points[tag].get(event.step)
                if previous is None or event.wall_time >= previous[0]:
                    points[tag][event.step] = (event.wall_time, float(event.value))
    return {tag: [(step, value) for step, (_, value) in sorted(by_step.items())] for tag, by_step in points.items()}


def plot_reward_curves(
    tb_dirs: Mapping[str, str | os.PathLike],
    path: str | os.PathLike,
    tags: Sequence[str] = DEFAULT_REWARD_TAGS,
) -> Path:
    """One panel per tag, one line per stage (``tb_dirs`` maps stage name -> its TensorBoard folder).

    A stage that never logged a tag is simply absent from that panel (e.g. an SFT stage has no
    rewards); a folder without event files is an error, as it almost always means a wrong path.
    """
    if not tb_dirs:
        raise ValueError("plot_reward_curves: no stages given")
    if not tags:
        raise ValueError("plot_reward_curves: no tags given")
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for stage, folder in tb_dirs.items():
        try:
            curves[stage] = read_scalars(folder, tags)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"plot_reward_curves: stage {stage!r}: {error}") from None
    if not any(points for by_tag in curves.values() for points in by_tag.values()):
        folders = {stage: str(folder) for stage, folder in tb_dirs.items()}
        raise ValueError(f"plot_reward_curves: none of the tags {list(tags)} was logged under any of {folders}")

    fig, axes = _figure(len(tags))
    colour = {stage: f"C{i % 10}" for i, stage in enumerate(curves)}  # a stage keeps its colour in every panel
    for ax, tag in zip(axes, tags):
        drawn = False
        for stage, by_tag in curves.items():
            if by_tag[tag]:
                steps, values = zip(*by_tag[tag])
                ax.plot(steps, values, label=stage, color=colour[stage])
                drawn = True
        ax.set_title(tag)
        ax.set_xlabel("step")
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def _accumulators(tb_dir: str | os.PathLike) -> list[Any]:
    """A loaded ``EventAccumulator`` per event file under ``tb_dir`` (all scalars kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(tb_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"TensorBoard folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob(f"*{_EVENT_FILE_MARK}*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents.*) under {str(folder)!r}")
    accumulators = []
    for file in files:
        accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0})
        accumulator.Reload()
        accumulators.append(accumulator)
    return accumulators


def _figure(panels: int) -> tuple[Any, list[Any]]:
    """A figure on its own Agg canvas: no pyplot, so no global backend switch and nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = PANEL_INCHES
    fig = Figure(figsize=(width * panels, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)
    return fig, list(axes[0])


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fig.savefig(partial, format="png", dpi=DPI)
    os.replace(partial, path)
    return path
