"""What the diagnostics write: diagnostics.jsonl and .csv (through `jaxal.results`), Fig. 3, the printed
tables and the per-sample files."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from jaxal import results
from jaxal.diagnostics.bounds import LOSS_LABELS, LOSSES, QUANTITIES, QUANTITY_LABELS

CSV_FIRST = ("strategy", "trial", "cycle", "num_labeled", "train_accuracy", "test_accuracy", "gap",
             "table1_overlap", "table1_k", "table2_k")


def csv_columns(rows: list[dict]) -> list[str]:
    seen = list(CSV_FIRST)
    for row in rows:
        seen += [c for c in row if c not in seen]
    return seen


def write_outputs(workdir: Path, rows: dict, samples: Optional[dict] = None, title: str = "") -> None:
    """diagnostics.jsonl/.csv, the figure, the tables and the new per-sample file (all rewritten whole,
    through `jaxal.results`)."""
    ordered = [rows[key] for key in sorted(rows)]
    results.write_jsonl(workdir / "diagnostics.jsonl", ordered)
    results.write_csv(workdir / "diagnostics.csv", ordered, columns=csv_columns(ordered))
    for (strategy, trial, cycle), arrays in (samples or {}).items():
        folder = workdir / "diagnostics_samples"
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        results.write_atomic(folder / f"{strategy}_trial{trial}_cycle{cycle}.npz", buffer.getvalue())
    if any("table2_k" in r for r in ordered):
        plot_fig3(workdir / "diagnostics_fig3.png", ordered, title)
    results.write_atomic(workdir / "diagnostics_tables.txt", format_tables(ordered) + "\n")


def _mean_by_cycle(rows: list[dict], strategy: str, field: str) -> dict[int, float]:
    """cycle -> mean over trials of `field` (rows lacking it are skipped)."""
    values = defaultdict(list)
    for r in rows:
        if r["strategy"] == strategy and r.get(field) is not None:
            values[r["cycle"]].append(r[field])
    return {c: float(np.mean(v)) for c, v in sorted(values.items())}


def _strategies(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["strategy"] for r in rows))


def _table(title: str, header: list[str], body: list[list[str]], note: str = "") -> str:
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    fmt = lambda line: "  ".join(str(v).rjust(w) if i else str(v).ljust(w)  # noqa: E731
                                 for i, (v, w) in enumerate(zip(line, widths)))
    lines = [title, fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(line) for line in body]
    return "\n".join(lines + ([note] if note else []))


def _count(value: Optional[float], k: Optional[float]) -> str:
    if value is None:
        return "-"
    text = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{text}/{k:.0f} ({100 * value / k:.0f}%)" if k else text


def format_tables(rows: list[dict]) -> str:
    """Fig. 3's averages and Tables 1-3 in the paper's layout (means over trials)."""
    if not rows:
        return "(no diagnostics yet)"
    strategies = _strategies(rows)
    cycles = sorted({r["cycle"] for r in rows})
    pair_cycles = sorted({r["cycle"] for r in rows if "table2_k" in r})
    losses = [name for name in LOSSES if any(f"{name}_target_mean" in r for r in rows)]
    parts = []
    for strategy in strategies:
        body = []
        for name in losses:
            for q in QUANTITIES:
                means = _mean_by_cycle(rows, strategy, f"{name}_{q}_mean")
                body.append([f"{name} {QUANTITY_LABELS[q]}"] + [f"{means[c]:.4g}" if c in means else "-"
                                                                 for c in pair_cycles])
            ratio = _mean_by_cycle(rows, strategy, f"{name}_ratio_approx3_target")
            body.append([f"{name} Approx-3/Target"] + [f"{ratio[c]:.3g}" if c in ratio else "-"
                                                       for c in pair_cycles])
        parts.append(_table(f"Fig. 3 ({strategy}): averages over the unlabelled pool of cycle c "
                            "(models of cycles c and c+1)", ["quantity"] + [f"c={c}" for c in pair_cycles], body))
    body = []
    for strategy in strategies:
        overlap, k = _mean_by_cycle(rows, strategy, "table1_overlap"), _mean_by_cycle(rows, strategy, "table1_k")
        body.append([strategy] + [_count(overlap.get(c), k.get(c)) for c in pair_cycles])
    parts.append(_table("Table 1: selected samples among the K of largest true-label gradient norm (model c)",
                        ["strategy"] + [f"c={c}" for c in pair_cycles], body))
    body = []
    for strategy in strategies:
        k = _mean_by_cycle(rows, strategy, "table2_k")
        for name in losses:
            for field, label in (("overlap_target_approx3", "Target"), ("overlap_abs_target_approx3", "|Target|")):
                overlap = _mean_by_cycle(rows, strategy, f"{name}_{field}")
                body.append([f"{strategy} {name} {label}"] + [_count(overlap.get(c), k.get(c)) for c in pair_cycles])
    parts.append(_table("Table 2: overlap of the top-K by Eq. 3 (largest Target = most beneficial; or largest "
                        "|Target|) and by Eq. 5 (Approx-3)", ["strategy, loss, Eq. 3 by"]
                        + [f"c={c}" for c in pair_cycles], body))
    body = []
    for strategy in strategies:
        gap = _mean_by_cycle(rows, strategy, "gap")
        body.append([strategy] + [f"{100 * gap[c]:.2f}" if c in gap else "-" for c in cycles])
    parts.append(_table("Table 3: train accuracy - test accuracy (percentage points)",
                        ["strategy"] + [f"c={c}" for c in cycles], body))
    return "\n\n".join(parts)


def plot_fig3(path: Path, rows: list[dict], title: str = "") -> None:
    """The paper's Fig. 3: the pool averages of Target and Approx-1/2/3 over cycles, one panel per loss,
    a row per strategy, log-scale y. A negative average Target is drawn at its absolute value with a
    hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in _strategies(rows) if any("table2_k" in r and r["strategy"] == s for r in rows)]
    losses = [name for name in LOSSES if any(f"{name}_target_mean" in r for r in rows)]
    fig, axes = plt.subplots(len(strategies), len(losses), figsize=(4.6 * len(losses), 3.1 * len(strategies)),
                             squeeze=False, sharex=True)
    styles = {"target": ("k", "o"), "approx1": ("tab:blue", "s"), "approx2": ("tab:orange", "^"),
              "approx3": ("tab:green", "D")}
    for i, strategy in enumerate(strategies):
        for j, name in enumerate(losses):
            ax = axes[i, j]
            for q in QUANTITIES:
                means = _mean_by_cycle(rows, strategy, f"{name}_{q}_mean")
                xs = np.array(list(means), float)
                ys = np.array(list(means.values()))
                color, marker = styles[q]
                ax.plot(xs, np.abs(ys), color=color, lw=1.3, label=QUANTITY_LABELS[q])
                for x, y in zip(xs, ys):
                    ax.plot([x], [abs(y)], marker=marker, color=color, ms=4,
                            markerfacecolor=color if y > 0 else "none")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{strategy}: {LOSS_LABELS[name]}", fontsize=9)
            if i == len(strategies) - 1:
                ax.set_xlabel("AL cycle c (models c, c+1)")
            if j == 0:
                ax.set_ylabel("mean over pool")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def read_rows(workdir: Path) -> dict:
    path = Path(workdir) / "diagnostics.jsonl"
    if not path.exists():
        return {}
    return {(r["strategy"], r["trial"], r["cycle"]): r for r in results.read_jsonl(path)}
