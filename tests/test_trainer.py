"""The training loop for real: tiny runs of the embedded model on the synthetic task."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from conftest import DIE_AFTER_CHECKPOINT, REPO, rl_args, run_tsallis, torchrun
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tsallis_core.config import OptimConfig, load_config
from tsallis_core.training.engines import TorchEngine
from tsallis_core.training.recipe import TrainingDiverged
from tsallis_core.training.trainer import train


def weights(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["garl", "paft", "grpo"])
def test_rl_run_logs_diagnostics_and_saves_a_loadable_model(base_model, task_dir, tmp_path, estimator):
    out = tmp_path / estimator
    run_tsallis(*rl_args(base_model, task_dir, out, f"rl.estimator={estimator}", "rl.q=0.75", "steps=3"))
    rows = history(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "success_rate",
        "frac_zero_success",
        "loss",
        "grad_norm",
        "lr",
        "completion_tokens_per_s",
        "peak_memory_gb",
        "attenuation_mean" if estimator == "paft" else "clip_frac",
    ):
        assert key in rows[0]
    amplified = ("q", "amp_mean", "amp_max")  # GRPO has no q
    assert all((key in rows[0]) == (estimator != "grpo") for key in amplified)
    assert 0 < sum(r["success_rate"] for r in rows) / 3 < 1  # the base model gives mixed rewards
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers loads the result
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not torch.equal(
        weights(out / "model")["model.embed_tokens.weight"], weights(base_model)["model.embed_tokens.weight"]
    )


def test_sigkill_and_resume_matches_an_uninterrupted_run(base_model, task_dir, tmp_path):
    args = ["steps=6", "checkpoint_every=2", "rl.estimator=garl", "rl.q=0.5"]
    straight = tmp_path / "straight"
    run_tsallis(*rl_args(base_model, task_dir, straight, *args))

    killed = tmp_path / "killed"
    env = {**os.environ, "TQDM_DISABLE": "1", "TSALLIS_TEST_DIE_AFTER_STEP": "4"}  # SIGKILLed after checkpoint 4
    main = "import sys; from tsallis_core.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", DIE_AFTER_CHECKPOINT + main, *rl_args(base_model, task_dir, killed, *args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoints" / "step-000004").is_dir() and not (killed / "model").exists()
    run_tsallis(*rl_args(base_model, task_dir, killed, *args), "--resume")

    a, b = weights(straight / "model"), weights(killed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = (
        "completion_tokens_per_s",
        "rollout_s",
        "step_s",
        "peak_memory_gb",
    )  # measurements of the machine, not of training
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert strip(history(straight)) == strip(history(killed))


def test_two_process_data_parallel_equals_one_process(base_model, task_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch trains the same model as 1 process.

    Sampling is a hash of (seed, step, prompt, sample), so both layouts draw the same completions;
    seq_sum averages over groups, so the averaged gradients are the same sum in another order.
    Tolerance: float32 reassociation over 4 steps of AdamW, 1e-4 absolute on weights of size ~0.1.
    """
    args = ["steps=4", "rl.estimator=garl", "rl.q=0.75", "checkpoint_every=0"]
    one = tmp_path / "one"
    run_tsallis(*rl_args(base_model, task_dir, one, *args))
    two = tmp_path / "two"
    result = torchrun(*rl_args(base_model, task_dir, two, *args))
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = weights(one / "model"), weights(two / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    sa, sb = [r["success_rate"] for r in history(one)], [r["success_rate"] for r in history(two)]
    assert sa == sb  # the same completions were sampled and verified


def test_deepspeed_two_processes_on_cpu_matches_plain_torch(base_model, task_dir, tmp_path):
    """DeepSpeed ZeRO-2 with 2 CPU processes (gloo) against plain PyTorch in one process, fp32."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra")
    args = ["steps=3", "rl.estimator=garl", "rl.q=0.75", "checkpoint_every=0"]
    plain = tmp_path / "plain"
    run_tsallis(*rl_args(base_model, task_dir, plain, *args))
    ds = tmp_path / "ds"
    result = torchrun(
        *rl_args(base_model, task_dir, ds, *args),
        "engine.backend=deepspeed",
        f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}",
        env={"DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = weights(plain / "model"), weights(ds / "model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert (ds / "checkpoints" / "step-000003" / "deepspeed").is_dir()


def test_nan_stops_the_run_and_names_the_step_and_the_checkpoint(base_model, task_dir, tmp_path):
    """float16 weights and SGD at lr 1e4 without clipping overflow after one step; the next loss is NaN."""
    cfg = load_config(
        None,
        rl_args(
            base_model,
            task_dir,
            tmp_path / "nan",
            "steps=5",
            "optim.optimizer=sgd",
            "optim.lr=1e4",
            "optim.grad_clip=0",
            "model.dtype=float16",
            "rl.estimator=garl",
            "rl.q=1",
            "checkpoint_every=1",
        )[1:],
    )
    with pytest.raises(TrainingDiverged) as error:
        train(cfg)
    message = str(error.value)
    assert re.search(r"(loss|gradient norm) is (nan|inf|-inf) at step \d", message), message
    assert re.search(r"checkpoints/step-\d{6}", message)  # the newest checkpoint (or the state before a skipped update)


def test_a_non_finite_gradient_skips_the_update():
    model = torch.nn.Linear(2, 1)
    engine = TorchEngine(model, OptimConfig(lr=0.1, grad_clip=0), total_steps=10)
    before = model.weight.detach().clone()
    (model(torch.tensor([[float("inf"), 1.0]])).sum()).backward()
    assert not math.isfinite(engine.step())
    assert torch.equal(model.weight, before) and model.weight.grad is None


def test_a_used_output_dir_needs_resume(base_model, task_dir, tmp_path):
    run_tsallis(*rl_args(base_model, task_dir, tmp_path, "steps=1"))
    again = run_tsallis(*rl_args(base_model, task_dir, tmp_path, "steps=1"), check=False)
    assert again.returncode == 2 and "holds checkpoints of an earlier run: pass --resume" in again.stderr


def test_sft_with_zero_steps_saves_the_starting_model_unchanged(base_model, task_dir, tmp_path):
    """warmup.steps: 0 in params.yaml skips the warm-up: the model passes through as it is."""
    from safetensors.torch import load_file

    run_tsallis(
        "train",
        "stage=sft",
        f"output_dir={tmp_path}",
        "steps=0",
        f"model.name_or_path={base_model}",
        f"data.train_path={task_dir / 'pretrain.jsonl'}",
        "tracking.enabled=false",
    )
    before, after = load_file(base_model / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lora_with_kl_uses_the_adapter_free_base_as_reference(base_model, task_dir, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    run_tsallis(
        *rl_args(
            base_model,
            task_dir,
            out,
            "steps=4",
            "rl.kl_coef=0.05",
            "model.lora.r=4",
            "model.lora.target_modules=[q_proj, v_proj]",
        )
    )
    # LoRA's B starts at zero: until the first update the policy is the reference and the KL is zero;
    # after it, the reference (adapters off) and the policy differ
    rows = history(out)
    first_update = next(i for i, r in enumerate(rows) if r["grad_norm"] > 0)
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-7) for r in rows[: first_update + 1])
    assert rows[first_update + 1]["kl"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # merged: plain transformers loads it
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_deepspeed_zero3_two_processes_gathers_full_weights(base_model, task_dir, tmp_path):
    """ZeRO-3 over 2 CPU processes: parameters are partitioned, the ranks decode in step (rollouts of
    different lengths would deadlock the per-forward gathers), and the saved model holds the full weights."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra")
    args = ["steps=2", "rl.estimator=paft", "rl.q=1", "checkpoint_every=0"]
    plain = tmp_path / "plain"
    run_tsallis(*rl_args(base_model, task_dir, plain, *args))
    z3 = tmp_path / "z3"
    result = torchrun(
        *rl_args(base_model, task_dir, z3, *args),
        "engine.backend=deepspeed",
        f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero3.json'}",
        env={"DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = weights(plain / "model"), weights(z3 / "model")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
