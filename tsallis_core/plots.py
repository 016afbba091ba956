"""Plots people look at: PNG files written with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .theory import EscapeRecord, NoiseRecord  # noqa: E402


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
