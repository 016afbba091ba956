"""Gradient flow of J_q on the softmax toy of docs/maths.md: escape time and label-noise memorisation.

Toy: one prompt, a softmax policy over K answers with logits theta, one correct answer c,
``p = softmax(theta)_c``. The flow ``d theta / dt = grad_theta ln_q p = p^(1-q) (e_c - softmax)``
keeps all wrong logits equal, so it is exactly the one-dimensional flow of the gap
``D = theta_c - theta_wrong``: ``dD/dt = K/(K-1) p^(1-q) (1-p)`` with ``p = 1/(1 + (K-1) e^-D)``,
i.e. ``dp/dt = K/(K-1) p^(2-q) (1-p)^2``. ``escape_time`` integrates that ODE to p = 1/2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from tsallis_core.maths.losses import check_q


def _check_p0(p0: float) -> None:
    if not (isinstance(p0, (int, float)) and 0.0 < p0 < 0.5):
        raise ValueError(f"p0 must be a starting success probability in (0, 0.5), got {p0!r}")


def _num_answers(p0: float, num_answers: int | None) -> int:
    k = num_answers if num_answers is not None else max(2, round(1.0 / p0))
    if k < 2:
        raise ValueError(f"num_answers must be >= 2, got {k}")
    return k


def escape_time(q: float, p0: float, num_answers: int | None = None, target: float = 0.5) -> float:
    """Time for the gradient flow of J_q to take p from p0 to ``target``.

    ``num_answers`` K defaults to round(1/p0) (uniform start); the initial logit gap is set so
    that p starts exactly at p0 for any K.
    """
    q = check_q(q)
    _check_p0(p0)
    k = _num_answers(p0, num_answers)
    gap0 = math.log(p0 * (k - 1) / (1.0 - p0))
    gap_target = math.log(target * (k - 1) / (1.0 - target))

    def p_of(gap: float) -> float:
        return 1.0 / (1.0 + (k - 1) * math.exp(-gap))

    def flow(_t, y):
        p = p_of(y[0])
        return [k / (k - 1) * p ** (1.0 - q) * (1.0 - p)]

    def reached(_t, y):
        return y[0] - gap_target

    reached.terminal = True
    horizon = 10.0 * escape_time_integral(q, p0, k, target) + 10.0
    from scipy.integrate import solve_ivp  # here, not at import: scipy costs every `tsallis` command half a second

    sol = solve_ivp(flow, (0.0, horizon), [gap0], method="LSODA", events=reached, rtol=1e-10, atol=1e-12)
    if not sol.t_events[0].size:
        raise RuntimeError(f"gradient flow did not reach p={target} by t={horizon:g} (q={q}, p0={p0})")
    return float(sol.t_events[0][0])


def escape_time_integral(q: float, p0: float, num_answers: int, target: float = 0.5) -> float:
    """The same time as a quadrature: ``(K-1)/K int_p0^target dp / (p^(2-q) (1-p)^2)`` (in log p)."""

    def integrand(log_p: float) -> float:
        p = math.exp(log_p)
        return p ** (q - 1.0) / (1.0 - p) ** 2

    from scipy.integrate import quad

    value, _ = quad(integrand, math.log(p0), math.log(target), epsabs=0.0, epsrel=1e-11, limit=200)
    return (num_answers - 1) / num_answers * value


def escape_time_asymptotic(q: float, p0: float) -> float:
    """Leading-order time (docs/maths.md): ``(p0^(q-1) - 2^(1-q)) / (1-q)``, ``ln(1/(2 p0))`` at q = 1."""
    if q == 1.0:
        return math.log(1.0 / (2.0 * p0))
    return (p0 ** (q - 1.0) - 2.0 ** (1.0 - q)) / (1.0 - q)


def fit_loglog_slope(p0s: list[float], times: list[float]) -> float:
    """Least-squares slope of log(escape time) against log(1/p0)."""
    slope, _ = np.polyfit(np.log(1.0 / np.asarray(p0s)), np.log(np.asarray(times)), 1)
    return float(slope)


@dataclass
class EscapeRecord:
    q: float
    p0: float
    escape_time: float


def escape_table(qs: list[float], p0s: list[float], num_answers: int | None = None) -> list[EscapeRecord]:
    return [EscapeRecord(q, p0, escape_time(q, p0, num_answers)) for q in qs for p0 in p0s]


def slopes_by_q(records: list[EscapeRecord]) -> dict[float, float]:
    qs = sorted({r.q for r in records})
    return {
        q: fit_loglog_slope([r.p0 for r in records if r.q == q], [r.escape_time for r in records if r.q == q])
        for q in qs
    }


# ---------------------------------------------------------------------------------------------
# label noise: how much probability each q puts on wrong labels
# ---------------------------------------------------------------------------------------------


@dataclass
class NoiseRecord:
    q: float
    noise_share: float
    horizon: float
    mass_on_wrong_label: float  # p_w at the horizon
    mass_on_correct: float  # p_c at the horizon
    limit_mass_on_wrong_label: float  # where the flow goes as t -> infinity


def noise_limit(q: float, noise_share: float) -> float:
    """Maximiser of ``(1-rho) ln_q p_c + rho ln_q p_w`` on the simplex: its mass on the wrong label.

    ``(1-rho) p_c^-q = rho p_w^-q`` gives ``p_w / p_c = (rho/(1-rho))^(1/q)``; 0 at q = 0
    (expected reward ignores the minority label), rho at q = 1 (likelihood memorises it).
    """
    q = check_q(q)
    if q == 0.0:
        return 0.0
    ratio = (noise_share / (1.0 - noise_share)) ** (1.0 / q)
    return ratio / (1.0 + ratio)


def noise_flow(q: float, noise_share: float, horizon: float = 1000.0, num_answers: int = 10) -> NoiseRecord:
    """Gradient flow of ``J_q = (1-rho) ln_q p_c + rho ln_q p_w`` from uniform logits.

    A share ``rho`` of the examples of one prompt type carries a wrong label w (a shared
    softmax over K answers, so the policy cannot fit both): the flow's mass on w at ``horizon``.
    """
    q = check_q(q)
    if not 0.0 < noise_share < 0.5:
        raise ValueError(f"noise_share must be in (0, 0.5) (a minority of wrong labels), got {noise_share!r}")
    if num_answers < 3:
        raise ValueError(f"num_answers must be >= 3 (correct, wrong label, others), got {num_answers}")

    def flow(_t, theta):
        z = np.exp(theta - theta.max())
        probs = z / z.sum()
        grad = np.zeros_like(theta)
        for index, weight in ((0, 1.0 - noise_share), (1, noise_share)):
            p = probs[index]
            e = np.zeros_like(theta)
            e[index] = 1.0
            grad += weight * p ** (1.0 - q) * (e - probs)
        return grad

    from scipy.integrate import solve_ivp

    sol = solve_ivp(flow, (0.0, horizon), np.zeros(num_answers), method="LSODA", rtol=1e-9, atol=1e-12)
    theta = sol.y[:, -1]
    probs = np.exp(theta - theta.max())
    probs /= probs.sum()
    return NoiseRecord(q, noise_share, horizon, float(probs[1]), float(probs[0]), noise_limit(q, noise_share))


def records_as_dicts(records) -> list[dict]:
    return [asdict(r) for r in records]
