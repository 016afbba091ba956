"""Faults and bad inputs, tried for real: crafted pickles, truncated checkpoints, killed processes, two runs on one
output_dir, unwritable or full disks, prompts longer than the model's context, non-UTF-8 rows (docs/reliability.md)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_tsallis, torchrun
from safetensors.torch import load_file

from tsallis_core.config import ConfigError
from tsallis_core.training.checkpoints import CheckpointError, check_output_dir, safe_load


class CreatesFile:
    """Unpickling this runs ``open(path, "w")``: the file appears when a loader executes the pickle's code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def sft_args(task_dir, out, *extra):
    return ["train", "stage=sft", f"output_dir={out}", f"data.train_path={task_dir / 'pretrain.jsonl'}",
            "sft.batch_size=8", "optim.lr=3e-3", "tracking.enabled=false", "engine.threads=1", "seed=1", *extra]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip() and "[WARNING]" not in line]


def weights_equal(a_dir, b_dir) -> bool:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def finished_run(task_dir, tmp_path_factory):
    """A 4-step SFT run with a checkpoint after every step (the newest two kept: step 3 and step 4)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_tsallis(*sft_args(task_dir, out, "steps=4", "checkpoint_every=1"))
    return out


def copy_run(run, dest):
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "model")
    return dest


def test_the_crafted_pickle_runs_code_when_loaded_unsafely(tmp_path):
    """The control: the crafted file is a live exploit, so the refusals below are real."""
    marker = tmp_path / "pwned"
    torch.save({"torch": torch.zeros(1), "x": CreatesFile(marker)}, tmp_path / "rng.pt")
    torch.load(tmp_path / "rng.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"rng.pt was refused: it holds objects other than tensors \(the global io"):
        safe_load(tmp_path / "rng.pt")
    assert not marker.exists()


@pytest.mark.parametrize("file", ["rng.pt", "engine.pt"])
def test_resume_refuses_a_tampered_checkpoint_in_one_line_and_runs_nothing(finished_run, task_dir, tmp_path, file):
    """A crafted object added to an otherwise valid rng.pt or engine.pt: refused, naming the file; no file created."""
    run = copy_run(finished_run, tmp_path / "run")
    target = run / "checkpoints" / "step-000004" / file
    marker = tmp_path / "pwned"
    state = torch.load(target, weights_only=True)
    state["extra"] = CreatesFile(marker)
    torch.save(state, target)
    result = run_tsallis(*sft_args(task_dir, run, "steps=5", "checkpoint_every=1"), "--resume", check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"checkpoint file {target} was refused" in lines[0] and "(the global io.open)" in lines[0]
    assert not marker.exists() and not (run / "model").exists()


def test_deepspeed_checkpoint_files_are_loaded_weights_only_before_deepspeed_reads_them(task_dir, tmp_path):
    """DeepSpeed reads its files with weights_only=False, so tsallis loads them weights-only first, allowing exactly
    the DeepSpeed classes of a ZeRO-2 checkpoint: a genuine one resumes; one with a crafted object is refused,
    naming the file, and the object never runs."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra")
    deepspeed = ["engine.backend=deepspeed", f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"]
    env = {"DS_ACCELERATOR": "cpu"}
    run = tmp_path / "run"
    result = torchrun(*sft_args(task_dir, run, "steps=2", "checkpoint_every=1", *deepspeed), env=env, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    tampered = copy_run(run, tmp_path / "tampered")
    result = torchrun(*sft_args(task_dir, run, "steps=3", "checkpoint_every=1", *deepspeed), "--resume", env=env, nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2, 3]
    target = tampered / "checkpoints" / "step-000002" / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    state = torch.load(target, weights_only=False)  # the genuine file, written by the run above
    state["extra"] = CreatesFile(marker)
    torch.save(state, target)
    result = torchrun(*sft_args(task_dir, tampered, "steps=3", "checkpoint_every=1", *deepspeed), "--resume", env=env,
                      nproc=1)
    refused = [line for line in result.stderr.splitlines() if line.startswith("tsallis: error:")]
    assert result.returncode != 0 and len(refused) == 1, result.stderr[-3000:]
    assert f"checkpoint file {target} was refused" in refused[0] and "(the global io.open)" in refused[0]
    assert not marker.exists() and not (tampered / "model").exists()


@pytest.mark.parametrize("damage", ["truncate engine.pt", "truncate rng.pt", "truncate trainer_state.json"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(finished_run, task_dir, tmp_path, damage):
    """The newest checkpoint (step 4) damaged: --resume warns, continues from step 3, and redoes step 4 to the same
    model as the uninterrupted run (bitwise)."""
    run = copy_run(finished_run, tmp_path / "run")
    target = run / "checkpoints" / "step-000004" / damage.split()[1]
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    result = run_tsallis(*sft_args(task_dir, run, "steps=4", "checkpoint_every=1"), "--resume")
    warnings = [line for line in result.stderr.splitlines() if "step-000004 is unreadable" in line]
    assert len(warnings) == 1 and "trying the previous one" in warnings[0] and target.name in warnings[0]
    assert weights_equal(finished_run / "model", run / "model")


def test_every_checkpoint_unreadable_is_one_clean_error(finished_run, task_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    for step in ("step-000003", "step-000004"):
        (run / "checkpoints" / step / "engine.pt").write_bytes(b"not a zip")
    result = run_tsallis(*sft_args(task_dir, run, "steps=4"), "--resume", check=False)
    lines = [line for line in error_lines(result) if not line.startswith("warning:")]
    assert result.returncode == 2 and len(lines) == 1 and "no readable checkpoint" in lines[0], result.stderr


# ------------------------------------------------------------------------------------------ one run per output_dir


def start_train(args) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tsallis_core.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_run_on_a_used_output_dir_is_refused_and_a_killed_runs_lock_is_taken_over(task_dir, tmp_path):
    out = tmp_path / "run"
    first = start_train(sft_args(task_dir, out, "steps=100000", "checkpoint_every=0"))
    lock = out / ".lock"
    deadline = time.time() + 300
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.time() < deadline, "the first run did not take the lock"
        time.sleep(0.05)
    assert lock.read_text().startswith(f"{first.pid}@")

    second = run_tsallis(*sft_args(task_dir, out, "steps=1"), check=False)
    lines = error_lines(second)
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"is in use by another tsallis run (process {first.pid}@" in lines[0]

    first.send_signal(signal.SIGKILL)
    first.wait()
    assert lock.read_text().startswith(f"{first.pid}@")  # the killed run's lock file stays behind: stale
    third = run_tsallis(*sft_args(task_dir, out, "steps=1"))
    assert f"took over the lock of output_dir {out} from process {first.pid}@" in third.stderr
    assert (out / "model").is_dir() and not lock.exists()  # released at the end


# ------------------------------------------------------------------------------------------ checked before loading


def mount_tmpfs(path, options: str) -> bool:
    """Mount a real tmpfs at ``path`` (root only); False where that is not permitted."""
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False,
                          capture_output=True).returncode == 0


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory that cannot be written: a read-only tmpfs when running as root (chmod does not stop root)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if not mount_tmpfs(path, "ro,size=1m"):
        pytest.skip("root without permission to mount a read-only tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB file system (tmpfs): too small for the embedded model's checkpoint (~8 MB)."""
    path = tmp_path / "tiny"
    path.mkdir()
    if not mount_tmpfs(path, "size=1m"):
        pytest.skip("mounting a small tmpfs needs root")
    yield path
    subprocess.run(["umount", str(path)], check=False)


def test_output_dir_that_cannot_be_written_fails_in_one_line_before_the_model_loads(task_dir, tmp_path, readonly_dir,
                                                                                   tiny_disk):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {a_file: "is a file", a_file / "run": f"lies under the file {a_file}",
             readonly_dir / "run": "cannot be written", tiny_disk / "run": "MiB free, a checkpoint needs about"}
    for out, message in cases.items():
        result = run_tsallis(*sft_args(task_dir, out, "steps=1"), check=False)
        lines = error_lines(result)
        assert result.returncode == 2 and len(lines) == 1 and f"output_dir {out}" in lines[0], result.stderr
        assert message in lines[0], lines[0]


def test_free_space_check_is_a_real_measurement(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_output_dir(tmp_path / "ok", need_bytes=1)
    with pytest.raises(ConfigError, match="MiB free"):
        check_output_dir(tmp_path / "ok", need_bytes=2 * free)


def test_an_rl_prompt_longer_than_the_models_context_fails_before_training(tmp_path):
    data = tmp_path / "train.jsonl"
    # the embedded model has 256 positions and a character tokenizer: 250 characters + 24 new tokens do not fit
    data.write_text('{"prompt": "1+2=", "answer": "3"}\n' + '{"prompt": "' + "1+" * 125 + '", "answer": "3"}\n')
    result = run_tsallis("train", "stage=rl", f"output_dir={tmp_path / 'run'}", f"data.train_path={data}",
                         "rl.group_size=2", "rl.batch_size=2", "rl.max_new_tokens=24", "tracking.enabled=false",
                         check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{data}: 1 prompt(s) do not fit the model's context of 256 tokens" in lines[0] and "row 1 (" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_non_utf8_row_is_named_by_file_and_row(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "b"}\n')
    result = run_tsallis("train", "stage=rl", f"output_dir={tmp_path / 'run'}", f"data.train_path={data}",
                         "tracking.enabled=false", check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{data}: 1 bad row(s): row 1: not UTF-8 (byte 0xe9" in lines[0]


def test_overrides_are_accepted_before_and_after_resume(finished_run, task_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    args = sft_args(task_dir, run, "checkpoint_every=1")
    result = run_tsallis(*args[:3], "--resume", *args[3:], "steps=5")
    assert "done:" in result.stdout and (run / "checkpoints" / "step-000005").is_dir()
