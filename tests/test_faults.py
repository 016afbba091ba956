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
    return [
        "train",
        "stage=sft",
        f"output_dir={out}",
        f"data.train_path={task_dir / 'pretrain.jsonl'}",
        "sft.batch_size=8",
        "optim.lr=3e-3",
        "tracking.enabled=false",
        "engine.threads=1",
        "seed=1",
        *extra,
    ]


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
    with pytest.raises(
        CheckpointError, match=r"rng.pt was refused: it holds objects other than tensors \(the global io"
    ):
        safe_load(tmp_path / "rng.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    "file, payload, named",
    [
        ("rng.pt", "CreatesFile", "io.open"),
        ("engine.pt", "CreatesFile", "io.open"),
        ("rng.pt", "RunsShell", "posix.system"),
    ],
)
def test_resume_refuses_a_tampered_checkpoint_in_one_line_runs_nothing_and_keeps_it(
    finished_run, task_dir, tmp_path, file, payload, named
):
    """A crafted object (open(), or os.system, which torch words as "module posix is blocked") added to an otherwise
    valid rng.pt or engine.pt: refused in one line naming the file and the global, nothing run, the file kept (no
    fallback, no rotation), and no advice to load with weights_only=False."""
    run = copy_run(finished_run, tmp_path / "run")
    target = run / "checkpoints" / "step-000004" / file
    marker = tmp_path / "pwned"
    state = torch.load(target, weights_only=True)
    state["extra"] = {"CreatesFile": CreatesFile, "RunsShell": RunsShell}[payload](marker)
    torch.save(state, target)
    result = run_tsallis(*sft_args(task_dir, run, "steps=6", "checkpoint_every=1"), "--resume", check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"checkpoint file {target} was refused" in lines[0] and f"(the global {named})" in lines[0]
    assert "weights_only=False" not in result.stderr and "weights_only` set to `False" not in result.stderr
    assert not marker.exists() and not (run / "model").exists() and target.is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


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
    result = torchrun(
        *sft_args(task_dir, run, "steps=3", "checkpoint_every=1", *deepspeed), "--resume", env=env, nproc=1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2, 3]
    target = tampered / "checkpoints" / "step-000002" / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    state = torch.load(target, weights_only=False)  # the genuine file, written by the run above
    state["extra"] = CreatesFile(marker)
    torch.save(state, target)
    result = torchrun(
        *sft_args(task_dir, tampered, "steps=3", "checkpoint_every=1", *deepspeed), "--resume", env=env, nproc=1
    )
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
    return subprocess.Popen(
        [sys.executable, "-m", "tsallis_core.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


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
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False, capture_output=True
        ).returncode
        == 0
    )


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


def test_output_dir_that_cannot_be_written_fails_in_one_line_before_the_model_loads(
    task_dir, tmp_path, readonly_dir, tiny_disk
):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = {
        a_file: "is a file",
        a_file / "run": f"lies under the file {a_file}",
        readonly_dir / "run": "cannot be written",
        tiny_disk / "run": "MiB free, a checkpoint needs about",
    }
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
    result = run_tsallis(
        "train",
        "stage=rl",
        f"output_dir={tmp_path / 'run'}",
        f"data.train_path={data}",
        "rl.group_size=2",
        "rl.batch_size=2",
        "rl.max_new_tokens=24",
        "tracking.enabled=false",
        check=False,
    )
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{data}: 1 prompt(s) do not fit the model's context of 256 tokens" in lines[0] and "row 1 (" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_non_utf8_row_is_named_by_file_and_row(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "caf\xe9", "answer": "b"}\n')
    result = run_tsallis(
        "train",
        "stage=rl",
        f"output_dir={tmp_path / 'run'}",
        f"data.train_path={data}",
        "tracking.enabled=false",
        check=False,
    )
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{data}: 1 bad row(s): row 1: not UTF-8 (byte 0xe9" in lines[0]


def test_overrides_are_accepted_before_and_after_resume(finished_run, task_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    args = sft_args(task_dir, run, "checkpoint_every=1")
    result = run_tsallis(*args[:3], "--resume", *args[3:], "steps=5")
    assert "done:" in result.stdout and (run / "checkpoints" / "step-000005").is_dir()


# ------------------------------------------------------------------------------------------ faults, second round


class RunsShell:
    """Unpickling this runs ``os.system`` (torch words its refusal "module posix is blocked", not "not allowed")."""

    def __init__(self, path):
        self.command = f"touch {path}"

    def __reduce__(self):
        return os.system, (self.command,)


def test_an_engine_pt_of_the_wrong_structure_is_unreadable_and_falls_back(finished_run, task_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    torch.save({"weights": torch.zeros(2)}, run / "checkpoints" / "step-000004" / "engine.pt")
    result = run_tsallis(*sft_args(task_dir, run, "steps=4", "checkpoint_every=1"), "--resume")
    warnings = [line for line in result.stderr.splitlines() if "step-000004 is unreadable" in line]
    assert len(warnings) == 1 and "wrong structure" in warnings[0], result.stderr
    assert weights_equal(finished_run / "model", run / "model")


def history_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_optimiser_settings_given_with_resume_apply_to_the_restored_state_and_config_yaml_records_them(
    finished_run, task_dir, tmp_path
):
    """The finished run trained at lr 3e-3: resumed with optim.lr=1e-3 the steps after the checkpoint run at 1e-3,
    and config.yaml says so; resumed with its own lr it is bitwise the run that did not stop (the fallback test)."""
    changed = copy_run(finished_run, tmp_path / "changed")
    run_tsallis(
        *sft_args(task_dir, changed, "steps=6", "checkpoint_every=1", "optim.lr=1e-3", "optim.weight_decay=0.1"),
        "--resume",
    )
    assert [(r["step"], r["lr"]) for r in history_of(changed)] == [
        (1, 3e-3),
        (2, 3e-3),
        (3, 3e-3),
        (4, 3e-3),
        (5, 1e-3),
        (6, 1e-3),
    ]
    assert "lr: 0.001" in (changed / "config.yaml").read_text()
    state = torch.load(changed / "checkpoints" / "step-000006" / "engine.pt", weights_only=True)
    assert [(g["lr"], g["weight_decay"]) for g in state["optimizer"]["param_groups"]] == [(1e-3, 0.1)]
    kept = copy_run(finished_run, tmp_path / "kept")
    run_tsallis(*sft_args(task_dir, kept, "steps=6", "checkpoint_every=1"), "--resume")
    assert not weights_equal(kept / "model", changed / "model")  # the new settings are what ran


@pytest.fixture(scope="module")
def rl_run(task_dir, tmp_path_factory):
    """One GARL q=0.75 step of the embedded model, checkpointed."""
    out = tmp_path_factory.mktemp("rl") / "run"
    run_tsallis(
        "train",
        "stage=rl",
        f"output_dir={out}",
        f"data.train_path={task_dir / 'train.jsonl'}",
        "steps=1",
        "rl.group_size=2",
        "rl.batch_size=4",
        "rl.max_new_tokens=4",
        "rl.estimator=garl",
        "rl.q=0.75",
        "tracking.enabled=false",
        "engine.threads=1",
    )
    return out


@pytest.mark.parametrize(
    "change, named",
    [
        (["rl.estimator=paft", "rl.q=1"], "rl.estimator is 'garl' in the checkpoint, 'paft' now"),
        (["rl.q=0.5"], "rl.q is 0.75 in the checkpoint, 0.5 now"),
        (
            ["model.name_or_path=embedded:other"],
            "model.name_or_path is 'embedded:tiny' in the checkpoint, 'embedded:other' now",
        ),
        (["optim.optimizer=sgd"], "optim.optimizer is 'adamw' in the checkpoint, 'sgd' now"),
    ],
)
def test_resume_that_would_change_the_run_is_refused_in_one_line_naming_both_values(rl_run, task_dir, change, named):
    before = (rl_run / "config.yaml").read_text()
    result = run_tsallis(
        "train",
        "stage=rl",
        f"output_dir={rl_run}",
        f"data.train_path={task_dir / 'train.jsonl'}",
        "steps=2",
        "rl.group_size=2",
        "rl.batch_size=4",
        "rl.max_new_tokens=4",
        "rl.estimator=garl",
        "rl.q=0.75",
        "tracking.enabled=false",
        *change,
        "--resume",
        check=False,
    )
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    if named:
        assert "--resume would change the run" in lines[0] and named in lines[0], lines[0]
    assert (rl_run / "config.yaml").read_text() == before and not (rl_run / ".lock").exists()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_without_a_checkpoint_is_one_line(task_dir, tmp_path, where):
    out = tmp_path / "run"
    if where == "empty":
        out.mkdir()
    result = run_tsallis(*sft_args(task_dir, out, "steps=2"), "--resume", check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"--resume: output_dir {out}" in lines[0] and "run without --resume" in lines[0]
    assert not (out / "history.jsonl").exists()


def test_a_history_line_cut_short_is_dropped_on_resume_and_a_bad_line_inside_is_named(finished_run, task_dir, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    with (run / "history.jsonl").open("a") as f:
        f.write('{"loss": 2.5, "gra')  # killed mid-write
    result = run_tsallis(*sft_args(task_dir, run, "steps=5", "checkpoint_every=1"), "--resume")
    assert "dropped its last line" in result.stderr
    assert [r["step"] for r in history_of(run)] == [1, 2, 3, 4, 5]

    broken = copy_run(finished_run, tmp_path / "broken")
    lines = (broken / "history.jsonl").read_text().splitlines()
    (broken / "history.jsonl").write_text("\n".join([lines[0], "garbage", *lines[2:]]) + "\n")
    config_before = (broken / "config.yaml").read_text()
    result = run_tsallis(*sft_args(task_dir, broken, "steps=7", "checkpoint_every=1"), "--resume", check=False)
    errors = error_lines(result)
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert f"{broken / 'history.jsonl'}: line 2 is not a step's metrics" in errors[0]
    assert (broken / "config.yaml").read_text() == config_before  # written only once the run can start
    assert not (broken / ".lock").exists()  # the error left no lock


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
        ("optim.eps=.nan", "optim.eps: Input should be a finite number"),
        ("tracking.sweep=it's", "tracking.sweep: String should match pattern"),
        ("tracking.run_name=../up", "tracking.run_name: String should match pattern"),
    ],
)
def test_non_finite_numbers_and_unsafe_names_are_refused_by_validation(task_dir, tmp_path, override, field):
    result = run_tsallis(*sft_args(task_dir, tmp_path / "run", "steps=2"), override, check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and field in lines[0], result.stderr
    assert not (tmp_path / "run" / ".lock").exists()


def test_divergence_is_one_line_naming_the_step_and_the_settings_and_leaves_no_lock(task_dir, tmp_path):
    out = tmp_path / "run"
    result = run_tsallis(*sft_args(task_dir, out, "steps=20", "optim.lr=1e8", "optim.grad_clip=0"), check=False)
    lines = [line for line in error_lines(result) if not line.startswith("warning:")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "at step " in lines[0] and "lower optim.lr (now 1e+08) or set optim.grad_clip" in lines[0], lines[0]
    assert not (out / ".lock").exists()


def test_a_lock_file_that_is_a_link_is_not_followed_and_its_target_not_shown(task_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(secret)
    result = run_tsallis(*sft_args(task_dir, out, "steps=1"), check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and "is a symbolic link" in lines[0], result.stderr
    assert secret.read_text() == "password=hunter2\n" and "hunter2" not in result.stderr + result.stdout


def test_a_data_path_that_is_a_directory_says_so(task_dir, tmp_path):
    result = run_tsallis(*sft_args(task_dir, tmp_path / "run", "steps=1"), f"data.train_path={task_dir}", check=False)
    lines = error_lines(result)
    assert result.returncode == 2 and len(lines) == 1 and f"dataset file {task_dir} is a directory" in lines[0]


@pytest.mark.parametrize("names", [("/etc", "run", "warmup"), ("s", "..", "warmup"), ("s", "run", "a/../../x")])
def test_the_kubeflow_checkpoint_path_stays_under_its_root(tmp_path, names):
    from tsallis_kubeflow.settings import checkpoint_path

    with pytest.raises(ConfigError, match="would put checkpoints outside"):
        checkpoint_path(str(tmp_path), *names)
    assert checkpoint_path(str(tmp_path), "s", "run", "garl-q0.5-seed0") == str(
        tmp_path / "s" / "run" / "garl-q0.5-seed0"
    )
