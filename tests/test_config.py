"""Configs are validated before any model loads, with errors that name the field."""

import json

import pytest
from conftest import run_tsallis

from tsallis_core.config import ConfigError, load_config, parse_overrides
from tsallis_core.data.records import DatasetError, load_records


def test_overrides_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: rl\nrl:\n  estimator: paft\n  q: 0.5\n")
    cfg = load_config(path, ["rl.group_size=4", "rl.batch_size=16", "optim.lr=3e-4"])
    assert (cfg.rl.estimator, cfg.rl.schedule.q, cfg.rl.group_size, cfg.optim.lr) == ("paft", 0.5, 4, 3e-4)
    assert parse_overrides(["a.b.c=1", "a.d=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.group_size=3"], "batch_size (64) must be divisible by group_size (3)"),
        (["rl.q=1.5"], "rl.q: Input should be less than or equal to 1"),
        (["rl.estimator=ppo"], "rl.estimator: Input should be 'garl', 'paft' or 'grpo'"),
        (["rl.group_size=1"], "rl.group_size: Input should be greater than or equal to 2"),
        (["rl.baseline=median"], "rl.baseline: Input should be 'none', 'mean' or 'loo'"),  # the args class's Literal
        (["rl.q_schedule={kind: exponential}"], "rl.q_schedule"),
        (["optim.grad_accum=3"], "optim.grad_accum (3) must divide the prompts per step"),
        (["nonsense=1"], "nonsense: Extra inputs are not permitted"),
        (["rl.q"], "must look like key=value"),
        (["steps=0"], "steps must be at least 1 for stage rl"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert message in str(error.value)


def test_cli_rejects_bad_config_before_loading_anything(tmp_path):
    result = run_tsallis("train", "rl.q=2", f"output_dir={tmp_path}", check=False)
    assert result.returncode == 2 and "rl.q: Input should be less than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "config.yaml").exists()


def test_missing_model_path(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\n", "answer": "02"}) + "\n")
    result = run_tsallis(
        "train", f"data.train_path={data}", "model.name_or_path=./no/such/model", "tracking.enabled=false", check=False
    )
    assert result.returncode == 2 and "model.name_or_path './no/such/model': no such directory" in result.stderr


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\n", "answer": "02"}) + "\n")
    result = run_tsallis(
        "train",
        f"data.train_path={data}",
        "model.name_or_path=tsallis-test/not-a-model",
        "tracking.enabled=false",
        f"output_dir={tmp_path / 'out'}",
        env={"HF_HUB_OFFLINE": "1"},
        check=False,
    )
    assert result.returncode == 2
    assert "model.name_or_path 'tsallis-test/not-a-model' could not be loaded" in result.stderr


def test_missing_empty_and_malformed_datasets(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="is empty"):
        load_records(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "Q: 1+1\n", "answer": "02"})
        + "\n"
        + "{not json\n"
        + json.dumps({"prompt": "Q: 2+2\n"})
        + "\n"
        + json.dumps({"prompt": "Q: 2+3\n", "answer": 5})
        + "\n"
    )
    with pytest.raises(DatasetError) as error:
        load_records(bad)
    text = str(error.value)
    assert "3 bad row(s)" in text and "row 1: not valid JSON" in text
    assert "row 2: missing field 'answer'" in text and "row 3: field 'answer' must be a non-empty string" in text
    result = run_tsallis("train", f"data.train_path={bad}", "tracking.enabled=false", check=False)
    assert result.returncode == 2 and "row 2: missing field 'answer'" in result.stderr


def test_train_help_lists_documented_fields():
    out = run_tsallis("train", "--help").stdout
    for field in ("rl.estimator", "rl.group_size", "rl.q_schedule", "optim.lr", "engine.backend", "model.lora.r"):
        assert field in out
