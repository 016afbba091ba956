"""Launching ``tsallis train`` on one node: in this process, or across the GPUs of this node (torchrun with
DeepSpeed). Across nodes, the Kubeflow layer runs the same entry point as a TrainJob (tsallis_kubeflow/trainjob.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> str:
    """A repository file (``configs/rl.yaml``) as given when it exists, else under ``$TSALLIS_HOME`` (the image
    sets it to where it keeps ``configs/``), else under the checkout that holds this package."""
    for candidate in (Path(path), Path(os.environ.get("TSALLIS_HOME", REPO_ROOT)) / path, REPO_ROOT / path):
        if candidate.exists():
            return str(candidate.resolve())
    return path  # load_config names the missing file


def train_argv(
    config: str,
    overrides: list[str],
    nproc: int = 1,
    deepspeed_config: str | None = None,
    distributed_args: tuple[str, ...] = ("--standalone",),
) -> list[str]:
    """The command that runs ``tsallis train`` on ``nproc`` processes of one node (torchrun) with DeepSpeed
    when ``deepspeed_config`` is given. ``distributed_args``: torchrun's rendezvous (``--standalone`` on one
    node; nothing on a TrainJob node, where the runtime sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR...)."""
    engine = ["engine.backend=deepspeed", f"engine.deepspeed_config={deepspeed_config}"] if deepspeed_config else []
    launcher = ["-m", "torch.distributed.run", *distributed_args, "--nproc_per_node", str(nproc)]
    return ["python", *launcher, "-m", "tsallis_core.cli", "train", "--config", config, *overrides, *engine]


def run_training(
    config: str,
    overrides: list[str],
    gpus: int = 0,
    deepspeed_config: str = "configs/deepspeed/zero2.json",
    checkpoint_dir: str = "",
) -> dict[str, float]:
    """Train one stage on this node; returns the last step's metrics.

    One GPU or none: ``train(load_config(config, overrides))`` in this process. More GPUs: torchrun starts one
    process per GPU running ``tsallis train`` with DeepSpeed (``deepspeed_config``, ZeRO-2 by default).

    ``checkpoint_dir``: train there rather than in the config's ``output_dir`` (a volume that outlives the pod),
    resuming from the newest checkpoint that an earlier, killed attempt left; the finished run (without its
    checkpoints) is then copied to ``output_dir`` and the checkpoints are removed."""
    from tsallis_core.config import load_config
    from tsallis_core.training.checkpoints import checkpoint_dirs

    config = resolve_path(config)
    output_dir = load_config(config, overrides).output_dir  # a bad field fails here, before any process starts
    overrides = [*overrides, f"output_dir={checkpoint_dir}"] if checkpoint_dir else overrides
    cfg = load_config(config, overrides)
    cfg.check_processes(max(gpus, 1))
    resume = bool(checkpoint_dirs(Path(cfg.output_dir)))
    if resume:
        print(f"resuming from {checkpoint_dirs(Path(cfg.output_dir))[-1]}", flush=True)
    if gpus <= 1:
        from tsallis_core.training.trainer import train

        final = train(cfg, resume=resume).final_metrics
    else:
        argv = train_argv(config, overrides, gpus, resolve_path(deepspeed_config))
        subprocess.run([sys.executable, *argv[1:], *(["--resume"] if resume else [])], check=True)
        final = json.loads((Path(cfg.output_dir) / "metrics.json").read_text())
    if checkpoint_dir:
        shutil.copytree(checkpoint_dir, output_dir, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
        shutil.rmtree(Path(checkpoint_dir) / "checkpoints", ignore_errors=True)
    return final
