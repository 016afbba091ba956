"""Plots people look at: PNG files written with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .theory import EscapeRecord, NoiseRecord  # noqa: E402

if TYPE_CHECKING:
    from .sweep import SweepRun


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_escape(records: list[EscapeRecord], slopes: dict[float, float], path: str | Path) -> Path:
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


def plot_noise(records: list[NoiseRecord], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for share in sorted({r.noise_share for r in records}):
        rows = sorted((r for r in records if r.noise_share == share), key=lambda r: r.q)
        line = ax.plot([r.q for r in rows], [r.mass_on_wrong_label for r in rows], "o-", label=f"wrong labels {share:.0%}")
        ax.plot([r.q for r in rows], [r.limit_mass_on_wrong_label for r in rows], "--", color=line[0].get_color(), alpha=0.6)
    ax.set_xlabel("q")
    ax.set_ylabel("probability on the wrong label")
    ax.set_title("Memorisation of wrong labels (solid: at horizon, dashed: limit)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _by_estimator(runs: list[SweepRun]) -> dict[str, list[SweepRun]]:
    groups: dict[str, list[SweepRun]] = {}
    for run in sorted(runs, key=lambda r: (r.estimator, r.q if r.q is not None else -1.0, r.seed)):
        groups.setdefault(run.estimator, []).append(run)
    return groups


def plot_success_curves(runs: list[SweepRun], threshold: float, path: str | Path) -> Path:
    """Training success rate against step: a panel per q-estimator, a line per q; GRPO dashed in every panel."""
    groups = _by_estimator(runs)
    baselines = groups.pop("grpo", [])
    panels = list(groups) or ["grpo"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, estimator in zip(axes[0], panels):
        colors = plt.cm.viridis([i / max(1, len(groups.get(estimator, [])) - 1) for i in range(len(groups.get(estimator, [])))])
        for run, color in zip(groups.get(estimator, []), colors):
            ax.plot([h["step"] for h in run.history], [h["success_rate"] for h in run.history], color=color,
                    label=f"q={run.q:g}" + (f" s{run.seed}" if len({r.seed for r in runs}) > 1 else ""))
        for run in baselines:
            ax.plot([h["step"] for h in run.history], [h["success_rate"] for h in run.history], "k--", alpha=0.7,
                    label="GRPO" + (f" s{run.seed}" if len(baselines) > 1 else ""))
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
        ax.set_title(estimator.upper())
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training success rate")
    return _save(fig, path)


def plot_escape_steps(runs: list[SweepRun], threshold: float, path: str | Path) -> Path:
    """Steps to escape (moving-average success >= threshold) against q; runs that never escape sit at the top."""
    from .sweep import steps_to_escape

    groups = _by_estimator(runs)
    baselines = groups.pop("grpo", [])
    never = max((len(r.history) for r in runs), default=1) + 1
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for estimator, members in groups.items():
        steps = [steps_to_escape(r.history, threshold) for r in members]
        ax.plot([r.q for r in members], [s if s is not None else never for s in steps], "o-", label=estimator.upper())
    for run in baselines:
        step = steps_to_escape(run.history, threshold)
        ax.axhline(step if step is not None else never, color="k", ls="--", alpha=0.7, label="GRPO")
    ax.axhline(never, color="grey", lw=0.8, ls=":")
    ax.text(0.0, never, " never escaped", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("q")
    ax.set_ylabel(f"steps to success rate {threshold:g}")
    ax.set_title("Cold-start escape against q")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_final_by_q(runs: list[SweepRun], metric: str, path: str | Path) -> Path:
    """Held-out pass@k and maj@k against q, per estimator; GRPO as horizontal lines."""
    groups = _by_estimator(runs)
    baselines = groups.pop("grpo", [])
    names = sorted({k for r in runs for k in r.evaluation if "@" in k}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        for estimator, members in groups.items():
            ax.plot([r.q for r in members], [r.evaluation.get(name, float("nan")) for r in members], "o-", label=estimator.upper())
        for run in baselines:
            ax.axhline(run.evaluation.get(name, float("nan")), color="k", ls="--", alpha=0.7, label="GRPO")
        ax.set_title(name + (" (champion metric)" if name == metric else ""))
        ax.set_xlabel("q")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out score")
    return _save(fig, path)
