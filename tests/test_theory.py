import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from tsallis_core.maths import theory

P0S = [1e-3, 1e-4, 1e-5]


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5])
def test_loglog_slope_is_one_minus_q(q):
    times = [theory.escape_time(q, p0) for p0 in P0S]
    assert abs(theory.fit_loglog_slope(P0S, times) - (1 - q)) < 0.05


def test_q1_escape_time_is_linear_in_log_one_over_p0():
    x = np.log(1 / np.array(P0S + [1e-6]))
    t = np.array([theory.escape_time(1.0, p0) for p0 in P0S + [1e-6]])
    slope, intercept = np.polyfit(x, t, 1)
    assert np.max(np.abs(t - (slope * x + intercept))) < 1e-3 * t.max()
    assert slope == pytest.approx(1.0, rel=0.01)  # d T / d log(1/p0) = (K-1)/K ~ 1


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0])
def test_ode_matches_quadrature(q):
    k = 1000
    assert theory.escape_time(q, 1e-4, k) == pytest.approx(theory.escape_time_integral(q, 1e-4, k), rel=1e-6)


def test_reduced_flow_equals_full_softmax_flow():
    """Integrate all K logits for a small K and compare with the one-dimensional flow."""
    k, q, p0 = 20, 0.5, 0.01
    theta0 = np.zeros(k)
    theta0[0] = math.log(p0 * (k - 1) / (1 - p0))

    def flow(_t, theta):
        probs = np.exp(theta - theta.max())
        probs /= probs.sum()
        e = np.zeros(k)
        e[0] = 1.0
        return probs[0] ** (1 - q) * (e - probs)

    def reached(_t, theta):
        probs = np.exp(theta - theta.max())
        return probs[0] / probs.sum() - 0.5

    reached.terminal = True
    sol = solve_ivp(flow, (0, 1e4), theta0, events=reached, rtol=1e-10, atol=1e-12)
    assert sol.t_events[0][0] == pytest.approx(theory.escape_time(q, p0, k), rel=1e-5)


def test_escape_time_ordering_by_q():
    times = [theory.escape_time(q, 1e-4) for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert times == sorted(times, reverse=True)


def test_noise_memorisation_grows_with_q_and_reaches_its_limit():
    records = [theory.noise_flow(q, 0.2, horizon=20000) for q in (0.0, 0.5, 1.0)]
    wrong = [r.mass_on_wrong_label for r in records]
    assert wrong == sorted(wrong)
    assert wrong[0] < 0.01  # q = 0 ignores the minority label
    assert wrong[2] == pytest.approx(0.2, abs=0.005)  # q = 1 memorises it: p_w -> rho
    assert records[1].limit_mass_on_wrong_label == pytest.approx(1 / 17)  # (0.25)^2 / (1 + 0.25^2)
    assert wrong[1] == pytest.approx(1 / 17, abs=0.005)


def test_bad_theory_arguments():
    with pytest.raises(ValueError, match="p0 must be"):
        theory.escape_time(0.5, 0.7)
    with pytest.raises(ValueError, match="q must be"):
        theory.escape_time(1.5, 0.01)
    with pytest.raises(ValueError, match="noise_share must be"):
        theory.noise_flow(0.5, 0.6)


def test_cli_json_and_table(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsallis_core.cli",
            "theory",
            "escape",
            "--q",
            "0",
            "1",
            "--p0",
            "1e-3",
            "1e-4",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    records = json.loads(out.stdout)
    assert [(r["q"], r["p0"]) for r in records] == [(0.0, 1e-3), (0.0, 1e-4), (1.0, 1e-3), (1.0, 1e-4)]
    assert all(r["escape_time"] > 0 for r in records)
    plot = tmp_path / "escape.png"
    table = subprocess.run(
        [sys.executable, "-m", "tsallis_core.cli", "theory", "escape", "--plot", str(plot)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "slope" in table.stdout and plot.read_bytes()[:4] == b"\x89PNG"
    noise = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsallis_core.cli",
            "theory",
            "noise",
            "--q",
            "0",
            "1",
            "--noise",
            "0.2",
            "--json",
            "--horizon",
            "100",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(json.loads(noise.stdout)) == 2


def test_cli_reports_bad_input_without_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "tsallis_core.cli", "theory", "escape", "--p0", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "p0 must be" in out.stderr and "Traceback" not in out.stderr
