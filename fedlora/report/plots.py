"""Plots of finished (or partial) runs, shared by ``fedlora.report.compare`` and ``fedlora.sweep``.

Every function takes *groups*: ``{label: [rows, rows, ...]}``, one ``results.jsonl`` row list
per seed, and draws one line per group (the mean over its seeds) with the ± one standard
deviation band shaded. Seeds are aligned by round number and cut to the rounds every seed
reached, so a partial run shortens its group's curve instead of skewing the mean.
matplotlib's Agg backend is used: no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def aligned(runs: list[list[dict]], field: str) -> tuple[np.ndarray, np.ndarray]:
    """The rounds every run reached and ``field`` on them: (rounds, values[run, round])."""
    common = set.intersection(*({r["round"] for r in rows} for rows in runs))
    rounds = np.array(sorted(common))
    values = np.array([[by_round[r][field] for r in rounds]
                       for by_round in ({row["round"]: row for row in rows} for rows in runs)],
                      dtype=float)
    return rounds, values


def mean_std(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over seeds (0 for a single seed)."""
    mean = values.mean(axis=axis)
    std = values.std(axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros_like(mean)
    return mean, std


def cumulative_bytes(runs: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, bytes up + down sent by the end of each round, per run)."""
    rounds, up = aligned(runs, "bytes_up_cum")
    _, down = aligned(runs, "bytes_down_cum")
    return rounds, up + down


def _line(ax, x, mean, std, label) -> None:
    (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)


def _save(fig, ax, path: Path, title: str | None) -> None:
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def axis_label(metric: str) -> str:
    return f"test {metric.replace('_', ' ')}"


def plot_accuracy_vs_round(groups: dict[str, list[list[dict]]], path, title: str | None = None,
                           metric: str = "accuracy") -> None:
    """The test ``metric`` (the task's primary one: accuracy, exact_match) against the round
    (round 0: before training)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        rounds, accuracy = aligned(runs, metric)
        _line(ax, rounds, *mean_std(accuracy), f"{label} (n={len(runs)})")
    ax.set_xlabel("round")
    ax.set_ylabel(axis_label(metric))
    _save(fig, ax, path, title)


def plot_accuracy_vs_bytes(groups: dict[str, list[list[dict]]], path, title: str | None = None,
                           metric: str = "accuracy") -> None:
    """The test ``metric`` against the cumulative bytes up + down (log scale; seeds' bytes differ
    when participation is random, so each point sits at the seeds' mean). Round 0, before any
    byte is sent, has no place on a log axis and is left out; so is a group whose runs withheld
    their bytes (client-level DP)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, runs in groups.items():
        if any(row["bytes_up_cum"] is None for rows in runs for row in rows):
            continue
        rounds, total = cumulative_bytes(runs)
        _, accuracy = aligned(runs, metric)
        sent = total.mean(axis=0) > 0
        mean, std = mean_std(accuracy[:, sent])
        _line(ax, total.mean(axis=0)[sent], mean, std, f"{label} (n={len(runs)})")
    if not ax.lines:
        ax.text(0.5, 0.5, "bytes withheld (client-level DP)", ha="center",
                transform=ax.transAxes)
    else:
        ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes up + down")
    ax.set_ylabel(axis_label(metric))
    _save(fig, ax, path, title)


def plot_privacy_utility(lines: dict[str, dict[float, list[float]]], path,
                         title: str | None = None, metric: str = "accuracy") -> None:
    """Final accuracy against the privacy budget ε: ``lines[label][epsilon] = [accuracy per
    seed]``, error bars ± one standard deviation. ε = inf (no DP) is drawn at the right end of
    the axis as a separate, unconnected "no DP" point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = sorted({e for points in lines.values() for e in points if math.isfinite(e)})
    # "no DP" sits one log-decade-ish step to the right of the largest finite ε.
    no_dp_x = finite[-1] * 3 if finite else 1.0
    for index, (label, points) in enumerate(lines.items()):
        # Lines are nudged sideways (a few % on the log axis) so equal points stay visible.
        dodge = 1 + 0.04 * (index - (len(lines) - 1) / 2)
        eps = [e for e in sorted(points) if math.isfinite(e)]
        stats = [mean_std(np.array(points[e], dtype=float)) for e in eps]
        color = None
        if eps:
            bars = ax.errorbar([e * dodge for e in eps], [float(m) for m, _ in stats], yerr=[float(s) for _, s in stats],
                               marker="o", capsize=3, label=label)
            color = bars.lines[0].get_color()
        if math.inf in points:
            mean, std = mean_std(np.array(points[math.inf], dtype=float))
            ax.errorbar([no_dp_x * dodge], [float(mean)], yerr=[float(std)], marker="s", capsize=3,
                        linestyle="none", color=color, label=None if eps else f"{label} (no DP)")
    if finite:
        ax.set_xscale("log")
        ax.set_xticks(finite + [no_dp_x])
        ax.set_xticklabels([f"{e:g}" for e in finite] + ["no DP"])
        ax.minorticks_off()
    else:
        ax.set_xticks([no_dp_x])
        ax.set_xticklabels(["no DP"])
    ax.set_xlabel("privacy budget ε")
    ax.set_ylabel(f"final {axis_label(metric)}")
    _save(fig, ax, path, title)
