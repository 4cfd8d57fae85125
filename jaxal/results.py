"""Run outputs: one JSON line per cycle, a CSV table and a PNG learning curve; the contact sheet of an
annotation round's chosen images.

Files are rewritten whole from the records (via a temporary file and a rename), so a run killed
at any moment leaves either the previous version or the new one, never half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("strategy", "trial", "cycle", "num_labeled", "test_accuracy", "train_accuracy",
               "train_loss", "train_seconds", "evaluate_seconds", "selection_seconds", "num_scored")
CSV_HEAD, CSV_TAIL = CSV_COLUMNS[:4], CSV_COLUMNS[6:]
# Detection's annotation cost in boxes, beside num_labeled (images), where the records hold it.
COST_COLUMNS = ("num_boxes", "num_selected", "boxes_selected")
# A metric's label on the plot and in the summary.
METRIC_LABELS = {"accuracy": "test accuracy", "miou": "test mIoU", "ap": "test AP@[.5:.95]"}


def csv_columns(records: list[dict]) -> list[str]:
    """CSV_COLUMNS, with the cost in boxes where the records count it (COST_COLUMNS) and the task's scalar
    metrics (test_*, then train_*, as the records hold them: e.g. test_miou, test_pixel_accuracy) in place
    of test_accuracy and train_accuracy; list-valued metrics (per-class IoU) stay in results.jsonl."""
    if not records:
        return list(CSV_COLUMNS)
    scalars = [k for k, v in records[0].items() if isinstance(v, (int, float)) and k not in CSV_HEAD + CSV_TAIL]
    metrics = [k for prefix in ("test_", "train_") for k in scalars if k.startswith(prefix)]
    costs = [k for k in COST_COLUMNS if k in records[0]]
    return list(CSV_HEAD) + costs + metrics + list(CSV_TAIL)


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(path: Path, records: list[dict], columns: list[str] | None = None) -> None:
    """The records as a CSV table, rewritten whole: `columns` (default: the run's, `csv_columns`) in
    that order, an empty cell where a record lacks one, fields outside them left out."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(records) if columns is None else columns,
                            extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(records)
    write_atomic(path, buffer.getvalue())


def learning_curves(records: list[dict], metric: str = "accuracy", x: str = "num_labeled"
                    ) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """strategy -> trial -> [(x, test_<metric>)] in cycle order; x = num_labeled (or num_boxes)."""
    curves: dict = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: (r["strategy"], r["trial"], r["cycle"])):
        curves[r["strategy"]][r["trial"]].append((r[x], r[f"test_{metric}"]))
    return curves


def plot_learning_curve(path: Path, records: list[dict], title: str = "", metric: str = "accuracy",
                        x: str = "num_labeled", xlabel: str = "labelled samples") -> None:
    """The test metric (accuracy, or a segmentation's mIoU) vs labelled samples: a thin line per trial,
    and with several trials the mean with a +-1 standard deviation band, one colour per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves = learning_curves(records, metric, x)
    for color, (strategy, trials) in zip(plt.cm.tab10.colors * 3, sorted(curves.items())):
        for trial, points in sorted(trials.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=color, alpha=0.35 if len(trials) > 1 else 1.0, lw=1,
                    marker="o", ms=3, label=None if len(trials) > 1 else strategy)
        if len(trials) > 1:
            length = min(len(p) for p in trials.values())  # trials still running are shorter
            xs = [x for x, _ in next(iter(trials.values()))[:length]]
            acc = np.array([[y for _, y in p[:length]] for p in trials.values()])
            mean, std = acc.mean(0), acc.std(0)
            ax.plot(xs, mean, color=color, lw=2, label=f"{strategy} (mean of {len(trials)})")
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABELS.get(metric, f"test {metric}"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def write_results(workdir: Path, records: list[dict], title: str = "", metric: str = "accuracy") -> None:
    write_jsonl(workdir / "results.jsonl", records)
    write_csv(workdir / "results.csv", records)
    if records:
        plot_learning_curve(workdir / "learning_curve.png", records, title, metric)
        if "num_boxes" in records[0]:  # detection: the cost in boxes
            plot_learning_curve(workdir / "learning_curve_boxes.png", records, title, metric, "num_boxes",
                                "boxes in the labelled set")


def summary_table(records: list[dict], metric: str = "accuracy") -> str:
    """Final test metric per strategy: mean +- std over trials, as printed at the end of a run."""
    finals: dict = defaultdict(dict)
    for r in records:
        previous = finals[r["strategy"]].get(r["trial"])
        if previous is None or r["cycle"] > previous["cycle"]:
            finals[r["strategy"]][r["trial"]] = r
    header = {"accuracy": "test acc", "miou": "test mIoU"}.get(metric, f"test {metric}")
    lines = [f"{'strategy':<20} {'labeled':>8} {header:>16}"]
    for strategy, by_trial in sorted(finals.items()):
        acc = np.array([r[f"test_{metric}"] for r in by_trial.values()])
        labeled = max(r["num_labeled"] for r in by_trial.values())
        spread = f" +- {acc.std():.4f}" if len(acc) > 1 else ""
        lines.append(f"{strategy:<20} {labeled:>8} {acc.mean():>8.4f}{spread}")
    return "\n".join(lines)


def curve_table(records: list[dict], metric: str, strategies: tuple[str, ...] = ()) -> str:
    """A Markdown table of the test `metric` (a record's `test_<metric>`, in %) per strategy (rows:
    `strategies` first, the rest sorted) and labelled-set size (columns): mean +- std over the trials,
    with the mean selection seconds per cycle of the cycles that scored candidates."""
    by: dict = defaultdict(lambda: defaultdict(list))
    seconds: dict = defaultdict(list)
    for r in records:
        by[r["strategy"]][r["num_labeled"]].append(r[f"test_{metric}"])
        if r.get("num_scored"):
            seconds[r["strategy"]].append(r["selection_seconds"])
    sizes = sorted({n for per_size in by.values() for n in per_size})
    order = [s for s in strategies if s in by] + sorted(set(by) - set(strategies))
    lines = ["| strategy | " + " | ".join(f"{n} labelled" for n in sizes) + " | selection s/cycle |",
             "|---" * (len(sizes) + 2) + "|"]
    for s in order:
        cells = []
        for n in sizes:
            values = np.array(by[s].get(n, []))
            cells.append(f"{100 * values.mean():.1f} +- {100 * values.std():.1f}" if len(values) else "")
        selection = f"{np.mean(seconds[s]):.1f}" if seconds[s] else "-"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {selection} |")
    trials = max(len(v) for per_size in by.values() for v in per_size.values())
    label = METRIC_LABELS.get(metric, f"test {metric}").replace("test ", "Test ", 1)
    return "\n".join(lines) + f"\n\n{label} (%) over {trials} trial(s): mean +- standard deviation.\n"


def contact_sheet(images: np.ndarray, captions: list[str], columns: int = 10, cell: int = 96) -> bytes:
    """A PNG of `images` (N, H, W, C) in a grid, `columns` wide, each scaled to about `cell` pixels (nearest
    neighbour, so small images stay sharp) with its caption under it. uint8 pixels are shown as they are;
    float images are stretched to their own range."""
    from PIL import Image, ImageDraw, ImageFont

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8:
        low, high = float(np.min(images)), float(np.max(images))
        images = np.round((images - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
    count, height, width = images.shape[:3]
    zoom = max(1, cell // max(height, width))
    font = ImageFont.load_default()
    line = 12
    tile_w, tile_h = max(width * zoom, 40), height * zoom + line + 4
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * (tile_w + 4) + 4, rows * (tile_h + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        pixels = image[..., 0] if image.shape[-1] == 1 else image[..., :3]
        tile = Image.fromarray(pixels).convert("RGB").resize((width * zoom, height * zoom), Image.NEAREST)
        x, y = 4 + (i % columns) * (tile_w + 4), 4 + (i // columns) * (tile_h + 4)
        sheet.paste(tile, (x, y))
        text = caption if len(caption) <= tile_w // 6 else "..." + caption[-(tile_w // 6 - 3):]
        draw.text((x, y + height * zoom + 2), text, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
