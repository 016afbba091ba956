"""Smoke test of benchmarks/throughput.py: every contender runs and reports positive figures (no timing checks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_reports_every_contender(tmp_path):
    pytest.importorskip("trl", reason="TRL is a test dependency: pip install -e '.[test]'")
    out = tmp_path / "throughput.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "throughput.py"),
            "--repeats",
            "1",
            "--steps",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        env={**os.environ, "TQDM_DISABLE": "1"},
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(out.read_text())
    assert set(report["medians"]) == {"ours-grpo", "ours-garl", "trl-grpo"}
    for name, figures in report["medians"].items():
        for key in ("tokens_per_s", "step_s", "peak_rss_mb", "generation_s", "logprob_forward_s", "backward_s"):
            assert figures[key] > 0, (name, key)
    assert set(report["ratios_vs_trl"]) == {"ours-grpo", "ours-garl"}
