"""FinQA / HotPotQA / MuSiQue loaders on invented fixtures in each dataset's native schema."""

import json
from pathlib import Path

import pytest
from conftest import run_tsallis

from tsallis_core.config import ModelConfig
from tsallis_core.data.reasoning import load_native, to_records
from tsallis_core.data.records import DatasetError
from tsallis_core.data.registry import get_dataset
from tsallis_core.training.models import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
FILES = {
    "finqa": FIXTURES / "finqa" / "test.json",
    "hotpotqa": FIXTURES / "hotpotqa" / "validation.jsonl",
    "musique": FIXTURES / "musique" / "dev.jsonl",
}


@pytest.mark.parametrize("dataset", list(FILES))
def test_local_files_map_to_one_schema_and_bad_rows_are_reported(dataset):
    rows, source = load_native(get_dataset(dataset), path=str(FILES[dataset]))
    records, report = to_records(get_dataset(dataset), rows, source)
    assert report.rows == 3 and report.kept == len(records) >= 1
    for r in records:
        assert {"id", "context", "question", "answer", "aliases", "source", "prompt"} <= r.keys()
        assert r["question"] in r["prompt"] and "Answer:" in r["prompt"]
    assert all(line.startswith("row ") and source in line for line in report.skipped)
    with pytest.raises(DatasetError, match=r"bad row\(s\) \(bad_rows=fail\): row \d of"):
        to_records(get_dataset(dataset), rows, source, bad_rows="fail")


def test_dataset_specific_fields():
    finqa, _ = to_records(get_dataset("finqa"), *load_native(get_dataset("finqa"), path=str(FILES["finqa"])))
    assert finqa[0]["answer"] == "20%" and finqa[0]["aliases"] == ["0.2"]  # exe_ans kept as an alias
    assert "revenue | $ 120 | $ 100" in finqa[0]["context"]  # the table as text
    musique, report = to_records(
        get_dataset("musique"), *load_native(get_dataset("musique"), path=str(FILES["musique"]))
    )
    assert musique[0]["aliases"] == ["FRD", "Freedonia dollar"]
    assert any("not answerable" in s for s in report.skipped) and any("int, not a string" in s for s in report.skipped)
    hotpot, report = to_records(
        get_dataset("hotpotqa"), *load_native(get_dataset("hotpotqa"), path=str(FILES["hotpotqa"]))
    )
    assert hotpot[0]["context"].startswith("Freedonia: ") and any(
        "no answer" in s or "empty context" in s for s in report.skipped
    )


def test_hub_path_through_datasets_on_a_local_repository(tmp_path):
    """The hub code path (load_dataset(id, config, split, data_files)) on a folder laid out like the hub repo."""
    repo = tmp_path / "MuSiQue"
    repo.mkdir()
    (repo / "musique_ans_v1.0_dev.jsonl").write_text(FILES["musique"].read_text())
    rows, source = load_native(get_dataset("musique"), hub_id=str(repo), split="validation")
    records, _ = to_records(get_dataset("musique"), rows, source)
    assert len(records) == 1 and source.endswith(":validation")
    with pytest.raises(ValueError, match="split must be one of train, validation"):
        load_native(get_dataset("musique"), hub_id=str(repo), split="test")


def test_truncation_by_tokens_is_counted():
    tokenizer = load_tokenizer(ModelConfig())
    rows, source = load_native(get_dataset("hotpotqa"), path=str(FILES["hotpotqa"]))
    records, report = to_records(get_dataset("hotpotqa"), rows, source, tokenizer=tokenizer, max_context_tokens=20)
    assert report.truncated == 2 and all(len(r["context"]) <= 20 for r in records)


def test_prepare_command_writes_records_for_the_trainer(tmp_path):
    out = tmp_path / "hotpot.jsonl"
    result = run_tsallis(
        "data", "prepare", "--dataset", "hotpotqa", "--path", str(FILES["hotpotqa"]), "--out", str(out)
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and "2 of 3 rows" in result.stdout and "skipped row 2" in result.stdout
    assert "data.verifier=em" in result.stdout
    failed = run_tsallis(
        "data",
        "prepare",
        "--dataset",
        "musique",
        "--path",
        str(FILES["musique"]),
        "--out",
        str(out),
        "--bad-rows",
        "fail",
        check=False,
    )
    assert failed.returncode == 2 and "row 1 of musique:dev.jsonl: not answerable" in failed.stderr
