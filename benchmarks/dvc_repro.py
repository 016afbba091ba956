"""Wall time and peak memory of the whole pipeline: ``dvc repro`` from scratch in a fresh git copy.

    python benchmarks/dvc_repro.py                                   # the default params.yaml
    python benchmarks/dvc_repro.py -S train.steps=20 -S 'sweep.q=[0.0,1.0]' --out outputs/dvc_repro.json

Copies the pipeline (dvc.yaml, params.yaml, configs, .dvc/config and plots) into a temporary git
repository, sets the ``-S`` overrides in its params.yaml, and runs ``dvc repro`` there while a sampler
adds up the resident memory of dvc and every process below it every 0.2 s. Prints the wall time, the
peak of that sum, the time of each stage (from dvc's output) and, with ``--out``, saves them as JSON.
A second ``dvc repro`` checks that nothing is left to do. Run it on a quiet machine: another job on
the same cores slows every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FILES = (
    "dvc.yaml",
    "params.yaml",
    "configs",
    ".dvc/config",
    ".dvc/plots",
    ".dvcignore",
    ".gitignore",
    "tsallis_core",
)  # the library: training stages depend on its files
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}


def set_param(params: dict, assignment: str) -> None:
    """``section.key=value`` (the value read as YAML, like ``dvc exp run -S``) into the params dict."""
    path, sep, raw = assignment.partition("=")
    keys = path.split(".")
    if not sep or len(keys) != 2 or keys[0] not in params or keys[1] not in params[keys[0]]:
        sys.exit(f"-S {assignment!r}: expected section.key=value with a key of params.yaml (e.g. train.steps=20)")
    params[keys[0]][keys[1]] = yaml.safe_load(raw)


def make_repo(root: Path, overrides: list[str]) -> None:
    """A git repository at ``root`` holding the pipeline files, with ``overrides`` set in params.yaml."""
    for name in PIPELINE_FILES:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for assignment in overrides:
        set_param(params, assignment)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pipeline"]):
        subprocess.run(["git", *args], cwd=root, env={**os.environ, **GIT_IDENTITY}, check=True, capture_output=True)


def run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; returns the result, its wall seconds and the peak summed RSS (bytes) of it and its children."""
    peak = 0
    done = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # ended between the listing and the reading
                    pass
            peak = max(peak, total)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a params.yaml value for this run (repeatable)",
    )
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("--keep", help="run in this directory (must not exist) and keep it, instead of a temporary one")
    args = parser.parse_args()

    dvc = shutil.which("dvc", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if dvc is None:
        sys.exit('dvc is not installed: pip install -e ".[dvc]"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # its own sqlite:///mlflow.db
    env |= {
        **GIT_IDENTITY,
        "TQDM_DISABLE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    with tempfile.TemporaryDirectory(prefix="dvc-repro-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "project"
        root.mkdir(parents=True)
        make_repo(root, args.overrides)
        print(f"dvc repro in {root} ...", flush=True)
        result, seconds, peak = run_measured([dvc, "repro"], root, env)
        if result.returncode:
            sys.exit(f"dvc repro failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        again = subprocess.run([dvc, "repro"], cwd=root, env=env, capture_output=True, text=True, check=False)
        stages = re.findall(r"Running stage '([^']+)'", result.stdout)
        report = {
            "overrides": args.overrides,
            "wall_s": round(seconds, 1),
            "peak_rss_gib": round(peak / 2**30, 3),
            "stages": len(stages),
            "cpus": os.cpu_count(),
            "second_repro_up_to_date": "Data and pipelines are up to date" in again.stdout,
            "metrics": json.loads((root / "outputs" / "report" / "metrics.json").read_text()),
        }
    print(
        f"dvc repro: {len(stages)} stages in {seconds / 60:.1f} min ({seconds:.0f} s) on {os.cpu_count()} CPUs; "
        f"peak memory {peak / 2**30:.2f} GiB (dvc and its children, summed); "
        f"second repro up to date: {report['second_repro_up_to_date']}"
    )
    champion = report["metrics"]["champion"]
    metric = next(k for k in report["metrics"] if k not in ("champion", "runs", "registered_version"))
    print(f"champion {champion}: {metric} = {report['metrics'][metric]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
