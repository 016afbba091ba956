"""FinQA, HotPotQA (distractor) and MuSiQue (answerable): loaders to one record schema, and prompts.

A record: ``id, context, question, answer, aliases, source`` plus the ``prompt`` built from a
per-dataset template (the trainer and the evaluator read ``prompt``, ``answer``, ``aliases``).
Each dataset's hub location, template, normaliser (``*_record`` below) and verifier are registered
once, in ``tasks/registry.py``; the functions here take its ``DatasetSpec``.
Rows come through Hugging Face ``datasets``, from the hub (id, config, split, revision) or from
local JSON/JSONL/Parquet files in the dataset's native schema. A bad row (no answer, a
non-string answer, an empty context or question) is reported with its index and source, then
skipped or made an error (``bad_rows``); nothing is dropped silently.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tsallis_core.data.records import DatasetError

if TYPE_CHECKING:
    from tsallis_core.data.registry import DatasetSpec

log = logging.getLogger(__name__)


class BadRow(ValueError):
    """A row that cannot become a record; the message says why."""


def _text(value: Any, name: str) -> str:
    if value is None:
        raise BadRow(f"no {name}")
    if not isinstance(value, str):
        raise BadRow(f"{name} is a {type(value).__name__}, not a string ({value!r})")
    if not value.strip():
        raise BadRow(f"empty {name}")
    return value.strip()


def finqa_record(row: dict) -> dict:
    qa = row.get("qa") or row
    table = "\n".join(" | ".join(str(c) for c in r) for r in (row.get("table") or []))
    context = "\n".join([*(row.get("pre_text") or []), table, *(row.get("post_text") or [])]).strip()
    executed = qa.get("exe_ans", qa.get("final_result"))
    answer = (
        qa.get("answer")
        if qa.get("answer") not in (None, "")
        else (str(executed) if executed not in (None, "") else None)
    )
    answer = _text(answer, "answer")
    aliases = [str(executed)] if executed not in (None, "") and str(executed) != answer else []
    return {
        "context": _text(context, "context"),
        "question": _text(qa.get("question"), "question"),
        "answer": answer,
        "aliases": aliases,
    }


def hotpotqa_record(row: dict) -> dict:
    ctx = row.get("context") or {}
    pairs = zip(ctx.get("title", []), ctx.get("sentences", [])) if isinstance(ctx, dict) else ctx
    context = "\n\n".join(f"{title}: {''.join(sentences)}" for title, sentences in pairs)
    return {
        "context": _text(context, "context"),
        "question": _text(row.get("question"), "question"),
        "answer": _text(row.get("answer"), "answer"),
        "aliases": [],
    }


def musique_record(row: dict) -> dict:
    if row.get("answerable") is False:
        raise BadRow("not answerable (only the answerable subset is used)")
    context = "\n\n".join(f"{p.get('title', '')}: {p.get('paragraph_text', '')}" for p in row.get("paragraphs") or [])
    aliases = [a for a in (row.get("answer_aliases") or []) if isinstance(a, str) and a.strip()]
    return {
        "context": _text(context, "context"),
        "question": _text(row.get("question"), "question"),
        "answer": _text(row.get("answer"), "answer"),
        "aliases": aliases,
    }


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)
    truncated: int = 0


def load_native(
    spec: DatasetSpec,
    path: str | None = None,
    hub_id: str | None = None,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
):
    """The dataset's rows in their native schema, through ``datasets`` (a local file, or the hub)."""
    import datasets

    if spec.normalize is None:
        raise ValueError(f"{spec.name} is not a published dataset with a loader; choose a dataset that has one")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DatasetError(f"--path {path} does not exist")
        builder = "parquet" if p.suffix == ".parquet" else "json"
        return datasets.load_dataset(builder, data_files=str(p), split="train"), f"{spec.name}:{p.name}"
    hub = hub_id or spec.hub_id
    split = split or spec.split
    data_files = spec.data_files if hub == spec.hub_id or Path(hub).is_dir() else None
    if data_files is not None and split not in data_files:
        raise ValueError(f"split must be one of {', '.join(data_files)} for {spec.name}; got {split!r}")
    if not Path(hub).is_dir():
        check_hub()
    try:
        rows = datasets.load_dataset(
            hub,
            config if config is not None else spec.hub_config,
            split=split,
            revision=revision,
            data_files={split: data_files[split]} if data_files else None,
        )
    except ConnectionError as error:  # offline mode and not in the cache
        raise DatasetError(f"{spec.name}: {error}; {LOCAL_FILES}") from None
    return rows, f"{spec.name}:{hub}:{split}"


LOCAL_FILES = (
    "give a local file in the dataset's original format instead (--path, or params.yaml's data.train_file "
    "and data.test_file; docs/datasets.md)"
)


def check_hub(timeout: float = 5.0) -> None:
    """A one-line DatasetError at once when the Hugging Face hub does not answer (instead of a minute of retries
    and a long traceback); nothing in offline mode (HF_HUB_OFFLINE=1 reads the datasets cache)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as error:
        raise DatasetError(
            f"cannot reach the Hugging Face hub at {constants.ENDPOINT} "
            f"({getattr(error, 'reason', error)}): {LOCAL_FILES}, or set HF_HUB_OFFLINE=1 to read "
            f"the datasets cache"
        ) from None


def to_records(
    spec: DatasetSpec,
    rows,
    source: str,
    bad_rows: str = "skip",
    tokenizer=None,
    max_context_tokens: int | None = None,
    template: str = "",
) -> tuple[list[dict], LoadReport]:
    """Native rows -> records with prompts (``template``, else the dataset's); bad rows reported by index, skipped
    or raised."""
    if bad_rows not in ("skip", "fail"):
        raise ValueError(f"bad_rows must be skip or fail; got {bad_rows!r}")
    report = LoadReport(source)
    records = []
    for index, row in enumerate(rows):
        report.rows += 1
        try:
            record = spec.normalize(row)
        except BadRow as why:
            report.skipped.append(f"row {index} of {source}: {why}")
            continue
        record["context"], cut = truncate(record["context"], tokenizer, max_context_tokens)
        report.truncated += cut
        record.update(id=str(row.get("id", row.get("_id", index))), source=source)
        record["prompt"] = build_prompt(template or spec.template, record, tokenizer)
        records.append(record)
    report.kept = len(records)
    if report.skipped:
        shown = "; ".join(report.skipped[:5]) + (
            f"; and {len(report.skipped) - 5} more" if len(report.skipped) > 5 else ""
        )
        if bad_rows == "fail":
            raise DatasetError(f"{len(report.skipped)} bad row(s) (bad_rows=fail): {shown}")
        log.warning("skipped %d of %d rows: %s", len(report.skipped), report.rows, shown)
    if report.truncated:
        log.warning(
            "truncated the context of %d of %d records to %s tokens", report.truncated, report.kept, max_context_tokens
        )
    return records, report


def truncate(context: str, tokenizer, max_tokens: int | None) -> tuple[str, int]:
    """The context cut to its first ``max_tokens`` tokens; (text, 1 if cut else 0)."""
    if tokenizer is None or max_tokens is None:
        return context, 0
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return context, 0
    return tokenizer.decode(ids[:max_tokens]), 1


def build_prompt(template: str, record: dict, tokenizer=None) -> str:
    """``template`` filled with the record's context and question; wrapped in the tokenizer's chat template when
    it has one."""
    text = template.format(context=record["context"], question=record["question"])
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text
