"""What of the one-GPU setup runs on CPU: the config flag, the optimiser choice, SDPA, gpu_check --smoke."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from tsallis_core.config import ConfigError, ModelConfig, OptimConfig, load_config
from tsallis_core.rollout.sampling import cache_kwarg, unwrap_model
from tsallis_core.training.engines import _optimizer
from tsallis_core.training.models import load_model


def test_compile_is_for_the_torch_backend():
    assert load_config(None, ["engine.compile=true"]).engine.compile
    with pytest.raises(ConfigError, match="engine: compile applies to backend torch"):
        load_config(None, ["engine.compile=true", "engine.backend=deepspeed"])


def test_fused_adamw_only_for_cuda_parameters():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert not _optimizer(params, OptimConfig(), fused=True).defaults.get("fused")  # CPU parameters: the loop
    assert isinstance(_optimizer(params, OptimConfig(optimizer="sgd"), fused=True), torch.optim.SGD)


def test_models_load_with_sdpa_attention():
    assert load_model(ModelConfig(), torch.device("cpu"), 0).config._attn_implementation == "sdpa"


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    def gpu_check(out, *extra):
        env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "gpu_check.py"),
                "--smoke",
                "--work",
                str(tmp_path),
                "--out",
                str(out),
                *extra,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(out.read_text()), result.stdout

    report, stdout = gpu_check(tmp_path / "smoke.json")
    rollouts = report["rollouts"]["B=8"]
    for name in ("ours_static_graph", "ours_eager", "hf_generate_dynamic", "hf_generate_static"):
        assert rollouts[name]["tokens_per_s"] > 0
    assert set(report["logprob_memory"]["8x8"]) == {"ours_chunked", "one_chunk_full_logits"}
    assert report["sft"]["torch"]["train_tokens_per_s"] > 0
    assert set(report["rl_step"]["split_s"]) == {"rollout", "logprobs", "backward", "optimizer"}
    assert report["graph_identity"]["bit_identical"] and report["lora_rollout"]["ran"]
    figures = [t["figure"] for t in report["targets"]]
    assert len(figures) == 6 and all(f"{f}: " in stdout for f in figures)  # one line per target (one rollout batch)
    # a second run in the same --work gets its own directory (the first run's checkpoints are not in its way);
    # with no time left, every section is skipped and the JSON still says so
    again, _ = gpu_check(tmp_path / "again.json", "--budget-s", "0")
    assert again["work"] != report["work"] and again["rollouts"] == {"skipped": "past the 0 s budget"}


def test_the_cache_argument_is_read_from_the_model_under_torch_compile():
    """engine.compile wraps the model: its wrapper's forward takes ``*args, **kwargs``, which named no cache argument and
    gave the deprecated ``past_key_values``; the name comes from the model's own class."""
    model = load_model(ModelConfig(), torch.device("cpu"), 0)
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    assert unwrap_model(compiled) is model and unwrap_model(torch.nn.Sequential(model)) is not model
    assert cache_kwarg(compiled) == cache_kwarg(model) == "cache"
