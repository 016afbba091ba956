"""Plots people look at: PNG files written with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tsallis_core.maths.estimators import baseline_estimator
from tsallis_core.maths.theory import EscapeRecord, NoiseRecord

if TYPE_CHECKING:
    from tsallis_core.studies.runs import SweepRun


def label_axes(ax, xlabel: str, title: str | None = None, ylabel: str | None = None, fontsize: int = 8) -> None:
    """The finishing touches every plot here shares: labels, a light grid and the legend."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=fontsize)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_theory_escape(records: list[EscapeRecord], slopes: dict[float, float], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for q, slope in slopes.items():
        rows = sorted((r for r in records if r.q == q), key=lambda r: r.p0, reverse=True)
        ax.loglog([1 / r.p0 for r in rows], [r.escape_time for r in rows], "o-", label=f"q={q:g} (slope {slope:.3f})")
    ax.set_xlabel("1 / p0 (rarer first success →)")
    ax.set_ylabel("escape time to p = 1/2")
    ax.set_title("Gradient flow of J_q on the softmax toy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_theory_noise(records: list[NoiseRecord], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for share in sorted({r.noise_share for r in records}):
        rows = sorted((r for r in records if r.noise_share == share), key=lambda r: r.q)
        line = ax.plot(
            [r.q for r in rows], [r.mass_on_wrong_label for r in rows], "o-", label=f"wrong labels {share:.0%}"
        )
        ax.plot(
            [r.q for r in rows], [r.limit_mass_on_wrong_label for r in rows], "--", color=line[0].get_color(), alpha=0.6
        )
    label_axes(
        ax, "q", "Memorisation of wrong labels (solid: at horizon, dashed: limit)", "probability on the wrong label"
    )
    return _save(fig, path)


def _by_estimator(runs: list[SweepRun]) -> dict[str, dict[float | None, list[SweepRun]]]:
    """Runs by estimator, then by q (the seeds of one setting together)."""
    groups: dict[str, dict[float | None, list[SweepRun]]] = {}
    for run in sorted(runs, key=lambda r: (r.estimator, r.q if r.q is not None else -1.0, r.seed)):
        groups.setdefault(run.estimator, {}).setdefault(run.q, []).append(run)
    return groups


def _seed_band(members: list[SweepRun], key: str = "success_rate"):
    """(steps, seed mean, seed min, seed max) of a per-step metric over the seeds of one setting."""
    length = min(len(r.history) for r in members)
    values = np.array([[h[key] for h in r.history[:length]] for r in members])  # [S, T]
    return [h["step"] for h in members[0].history[:length]], values.mean(0), values.min(0), values.max(0)


def plot_success_curves(runs: list[SweepRun], threshold: float, path: str | Path) -> Path:
    """Training success rate against step: a panel per q-estimator, a line per q (seed mean, band: seed min-max);
    GRPO dashed in every panel."""
    groups = _by_estimator(runs)
    baselines = groups.pop(baseline_estimator(), {}).get(None, [])
    panels = list(groups) or [baseline_estimator()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, estimator in zip(axes[0], panels):
        by_q = groups.get(estimator, {})
        colors = plt.cm.viridis(np.linspace(0, 1, max(1, len(by_q))))
        for (q, members), color in zip(by_q.items(), colors):
            steps, mean, low, high = _seed_band(members)
            ax.plot(
                steps, mean, color=color, label=f"q={q:g}" + (f" ({len(members)} seeds)" if len(members) > 1 else "")
            )
            ax.fill_between(steps, low, high, color=color, alpha=0.2)
        if baselines:
            steps, mean, low, high = _seed_band(baselines)
            ax.plot(
                steps,
                mean,
                "k--",
                alpha=0.8,
                label="GRPO" + (f" ({len(baselines)} seeds)" if len(baselines) > 1 else ""),
            )
            ax.fill_between(steps, low, high, color="k", alpha=0.1)
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
        ax.set_title(estimator.upper())
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training success rate (seed mean, band: min-max)")
    return _save(fig, path)


def plot_escape_steps(runs: list[SweepRun], threshold: float, path: str | Path) -> Path:
    """Steps to escape (moving-average success >= threshold) against q: seed median, bars from the fastest to the
    slowest seed; runs that never escape sit at the top."""
    from tsallis_core.studies.runs import steps_to_escape

    groups = _by_estimator(runs)
    baselines = groups.pop(baseline_estimator(), {}).get(None, [])
    never = max((len(r.history) for r in runs), default=1) + 1

    def steps_of(members: list[SweepRun]) -> list[int]:
        return sorted(s if (s := steps_to_escape(r.history, threshold)) is not None else never for r in members)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for estimator, by_q in groups.items():
        qs = list(by_q)
        spans = [steps_of(by_q[q]) for q in qs]
        medians = [s[(len(s) - 1) // 2] for s in spans]
        ax.errorbar(
            qs,
            medians,
            yerr=[[m - s[0] for m, s in zip(medians, spans)], [s[-1] - m for m, s in zip(medians, spans)]],
            fmt="o-",
            capsize=3,
            label=estimator.upper(),
        )
    if baselines:
        spans = steps_of(baselines)
        ax.axhline(spans[(len(spans) - 1) // 2], color="k", ls="--", alpha=0.7, label="GRPO (median seed)")
        ax.axhspan(spans[0], spans[-1], color="k", alpha=0.08)
    ax.axhline(never, color="grey", lw=0.8, ls=":")
    ax.text(0.0, never, " never escaped", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("q")
    ax.set_ylabel(f"steps to success rate {threshold:g}")
    ax.set_title("Cold-start escape against q (median seed, bars: seed range)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_final_by_q(runs: list[SweepRun], metric: str, path: str | Path) -> Path:
    """Held-out pass@k and maj@k against q, per estimator: seed mean, bars: seed range; GRPO as a line and band."""
    groups = _by_estimator(runs)
    baselines = groups.pop(baseline_estimator(), {}).get(None, [])
    names = sorted(
        {k for r in runs for k in r.evaluation if "@" in k}, key=lambda k: (k.split("@")[0], int(k.split("@")[1]))
    )
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for estimator, by_q in groups.items():
            values = [[r.evaluation.get(name, float("nan")) for r in members] for members in by_q.values()]
            means = [float(np.mean(v)) for v in values]
            ax.errorbar(
                list(by_q),
                means,
                yerr=[[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]],
                fmt="o-",
                capsize=3,
                label=estimator.upper(),
            )
        if baselines:
            values = [r.evaluation.get(name, float("nan")) for r in baselines]
            ax.axhline(float(np.mean(values)), color="k", ls="--", alpha=0.7, label="GRPO")
            ax.axhspan(min(values), max(values), color="k", alpha=0.08)
        ax.set_title(name + (" (champion metric)" if name == metric else ""))
        ax.set_xlabel("q")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out score (seed mean, bars: range)")
    return _save(fig, path)
