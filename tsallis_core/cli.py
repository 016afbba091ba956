"""The ``tsallis`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tsallis_core.maths import theory
from tsallis_core.maths.curves import ESCAPE_THRESHOLD


def _theory_escape(args: argparse.Namespace) -> int:
    records = theory.escape_table(args.q, args.p0, args.num_answers)
    if args.json:
        print(json.dumps(theory.records_as_dicts(records), indent=2))
        return 0
    slopes = theory.slopes_by_q(records)
    print(f"{'q':>6} {'p0':>10} {'escape_time':>14} {'leading order':>14}")
    for r in records:
        print(f"{r.q:>6g} {r.p0:>10.0e} {r.escape_time:>14.6g} {theory.escape_time_asymptotic(r.q, r.p0):>14.6g}")
    print("\nlog-log slope of escape time against 1/p0 (theory: 1 - q, 0 at q = 1 where time ~ log 1/p0):")
    for q, slope in slopes.items():
        print(f"  q={q:g}: slope {slope:.4f} (1-q = {1 - q:g})")
    from tsallis_core.studies.plots import plot_theory_escape

    print(f"\nplot: {plot_theory_escape(records, slopes, args.plot)}")
    return 0


def _theory_noise(args: argparse.Namespace) -> int:
    records = [theory.noise_flow(q, share, args.horizon, args.num_answers) for share in args.noise for q in args.q]
    if args.json:
        print(json.dumps(theory.records_as_dicts(records), indent=2))
        return 0
    print(f"{'q':>6} {'wrong labels':>12} {'p(wrong) at T':>14} {'p(correct) at T':>16} {'p(wrong) limit':>15}")
    for r in records:
        print(
            f"{r.q:>6g} {r.noise_share:>12.0%} {r.mass_on_wrong_label:>14.4f} {r.mass_on_correct:>16.4f}"
            f" {r.limit_mass_on_wrong_label:>15.4f}"
        )
    from tsallis_core.studies.plots import plot_theory_noise

    print(f"\nhorizon T = {args.horizon:g}; plot: {plot_theory_noise(records, args.plot)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tsallis_core.config import load_config
    from tsallis_core.training.trainer import train

    overrides = args.overrides
    if args.params:
        from tsallis_core.params import params_train_overrides

        overrides = [*params_train_overrides(args.params), *overrides]  # the key=value overrides given win
    config = load_config(args.config, overrides)
    resume = args.resume
    if args.resume_if_any:
        from tsallis_core.training.checkpoints import checkpoint_dirs

        resume = bool(checkpoint_dirs(Path(config.output_dir)))
    result = train(config, resume=resume)
    summary = {k: round(v, 4) for k, v in result.final_metrics.items() if isinstance(v, float)}
    print(f"done: {result.output_dir} (model: {result.model_dir}); last step: {json.dumps(summary)}")
    return 0


def _track_sync(args: argparse.Namespace) -> int:
    from tsallis_core.tracking import sync_run

    print(sync_run(Path(args.output_dir), args.timeout))
    return 0


def _data_synthetic(args: argparse.Namespace) -> int:
    from tsallis_core.config import parse_overrides
    from tsallis_core.data.synthetic import SyntheticTaskConfig, write_splits

    task = SyntheticTaskConfig.model_validate(parse_overrides(args.overrides))
    for split, path in write_splits(task, args.out).items():
        print(f"{split}: {path}")
    print(
        "correct-answer rates of the pre-training corpus by number of terms: "
        + ", ".join(f"{n}: {c:.3f}" for n, c in task.correct_rates().items())
    )
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from tsallis_core.data.reasoning import load_native, to_records
    from tsallis_core.data.registry import get_dataset

    spec = get_dataset(args.dataset)
    tokenizer = None
    if args.tokenizer:
        from tsallis_core.config import ModelConfig
        from tsallis_core.training.models import load_tokenizer

        tokenizer = load_tokenizer(ModelConfig(name_or_path=args.tokenizer))
    rows, source = load_native(spec, args.path, args.hub_id, args.hub_config, args.split, args.revision)
    records, report = to_records(spec, rows, source, args.bad_rows, tokenizer, args.max_context_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(
        f"{report.kept} of {report.rows} rows from {source} -> {out}; skipped {len(report.skipped)}, "
        f"contexts truncated {report.truncated}; verify with data.verifier={spec.verifier}"
    )
    for line in report.skipped[:20]:
        print(f"  skipped {line}")
    return 0


def _data_task(args: argparse.Namespace) -> int:
    from tsallis_core.params import load_params
    from tsallis_core.prepare import write_task

    settings = load_params(args.params)
    for split, path in write_task(settings.data, args.out, settings.warmup.model).items():
        print(f"{split}: {path}")
    print(f"source {settings.data.source}, verifier {settings.data.verifier}: {args.out}/task.json")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tsallis_core.evaluation.evaluate import evaluate_model, write_json

    record = evaluate_model(
        args.model,
        args.data,
        args.n,
        args.k,
        args.verifier,
        args.temperature,
        args.max_new_tokens,
        args.seed,
        args.limit,
        settings=_rollout_settings(args),
    )
    metrics = record["metrics"]
    path = write_json(record, args.out)
    if args.track:
        from tsallis_core.tracking import MlflowTracker, eval_metric_name

        tracker = MlflowTracker()
        tracker.start(
            vars(args) | {"func": None}, run_name=f"evaluate-{Path(args.model).name}", tags={"stage": "evaluate"}
        )
        tracker.log_metrics({eval_metric_name(k): v for k, v in metrics.items()}, step=0)
        tracker.log_artifact(path)
        tracker.end()
    print(json.dumps(metrics, indent=2))
    print(f"metrics: {path}")
    return 0


def _rollout_settings(args: argparse.Namespace):
    """The decoder settings of ``--rollout key=value`` (training's ``rollout.*`` section), validated."""
    from tsallis_core.config import RolloutConfig, validate_settings

    return validate_settings(RolloutConfig, {}, args.rollout, "invalid --rollout")


def _diagnose(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from tsallis_core.evaluation.evaluate import diagnose, load_for_eval, sample_and_score, write_json

    settings = _rollout_settings(args)
    model, tokenizer, rows = load_for_eval(args.model, args.data, args.limit, args.seed)
    results = sample_and_score(
        model,
        tokenizer,
        rows,
        args.m,
        args.verifier,
        args.temperature,
        args.max_new_tokens,
        args.seed,
        settings=settings,
    )
    d = diagnose(results, args.verifier)
    payload = asdict(d)
    if Path(args.map).is_file():  # the measured simulator map revises the rule where it contradicts it
        from tsallis_core.studies.simulate import apply_map_advice, load_map, map_advice

        advice = map_advice(load_map(args.map), d.p0, d.group_size, args.optimizer)
        d = apply_map_advice(d, advice)
        payload = {**asdict(d), "map": asdict(advice)}
    else:
        print(f"(no simulator map at {args.map}: the rule alone; make one with tsallis simulate)")
    write_json(payload, args.out)
    print(
        f"p0 (one sample succeeds): {d.p0:.4f}; prompts with no success in {d.group_size} samples: {d.frac_zero_success:.1%}"
    )
    print(f"recommendation: estimator={d.estimator} q={d.q:g} group_size>={d.suggested_group_size} ({d.reason})")
    print(
        f"  tsallis train --config configs/rl.yaml rl.estimator={d.estimator} rl.q={d.q:g} "
        f"rl.group_size={max(d.suggested_group_size, 2)}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from tsallis_core.studies import sweep

    runs = sweep.select_runs(sweep.find_run_dirs(args.runs), args.evals, args.estimators, args.q, args.seeds)
    champion = sweep.pick_champion(runs, args.metric)
    registered = sweep.register_champion(champion, args.register_as, args.metric) if args.register_as else None
    if args.simulate and not (Path(args.simulate) / "results.json").is_file():
        raise SystemExit(
            f"tsallis: error: --simulate {args.simulate}: no results.json there; make the map with "
            "tsallis simulate --params configs/simulate_small.yaml --out DIR"
        )
    paths = sweep.write_report(runs, champion, args.out, args.metric, args.escape_threshold, registered, args.simulate)
    if args.sweep:
        parent = sweep.log_sweep(runs, args.sweep, args.out, champion, args.metric)
        print(f"MLflow: sweep {args.sweep!r} is parent run {parent} with {len(runs)} nested runs")
    print(paths["report"].read_text().split("\n\n")[1])
    if registered:
        print(f"registered {registered['name']} version {registered['version']}: {registered['decision']}")
    print(f"report: {paths['report']}")
    return 0


def _study_escape(args: argparse.Namespace) -> int:
    from tsallis_core.studies.escape import load_study, run_study

    parts = [p for p in args.parts or [] if "=" not in p]  # --parts core workers=2: the override is not a part
    overrides = [*args.overrides, *(p for p in args.parts or [] if "=" in p)]
    study = load_study(args.params, overrides)
    out = run_study(study, parts or None)
    if args.report:
        from tsallis_core.studies.escape_report import write_study_report

        print(f"report: {write_study_report(study, args.report)}")
    print(f"study: {out}")
    return 0


def _study_report(args: argparse.Namespace) -> int:
    from tsallis_core.studies.escape import load_study
    from tsallis_core.studies.escape_report import write_study_report

    print(f"report: {write_study_report(load_study(args.params, args.overrides), args.out)}")
    return 0


def _add_study_commands(commands) -> None:
    study = commands.add_parser("study", help="the cold-start escape study (cached, resumable, parallel runs)")
    sub = study.add_subparsers(dest="study_command", required=True)
    escape = sub.add_parser(
        "escape",
        help="run the study's parts: core, mechanism, noise, factors",
        description="Runs are cached under the params file's `out`; a rerun does only what is "
        "missing. Settings: the fields of tsallis_core.studies.escape.StudyConfig.",
    )
    escape.add_argument("--params", default="configs/study/escape.yaml", help="the study's params file (YAML)")
    escape.add_argument("--parts", nargs="*", help="parts to run (default: all): core mechanism noise factors")
    escape.add_argument("--report", help="also write the report (markdown and plots) into this directory")
    escape.add_argument("overrides", nargs="*", help="key=value overrides of the params, e.g. workers=1 seeds=2")
    escape.set_defaults(func=_study_escape)
    report = sub.add_parser("report", help="tables and plots from the runs done so far")
    report.add_argument("--params", default="configs/study/escape.yaml", help="the study's params file (YAML)")
    report.add_argument("--out", default="docs/escape", help="where the report and plots go")
    report.add_argument("overrides", nargs="*", help="key=value overrides of the params")
    report.set_defaults(func=_study_report)


def _add_eval_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--model", required=True, help="model directory, hub id, or embedded:tiny")
    parser.add_argument(
        "--data", default="data/synthetic/test.jsonl", help="JSONL rows with prompt and answer (aliases optional)"
    )
    from tsallis_core.data.registry import verifier_help

    parser.add_argument("--verifier", default="exact", help=f"the reward (tasks/registry.py): {verifier_help()}")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N rows (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rollout",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="decoder settings as training's rollout section sets them, e.g. static_cache=false "
        "cuda_graphs=auto (see `tsallis train --help`)",
    )
    parser.add_argument("--out", default=out, help="where to write the JSON result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsallis", description="Training reasoning models on the Tsallis loss continuum."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    theory_parser = commands.add_parser("theory", help="gradient-flow theory of J_q on the softmax toy")
    theory_commands = theory_parser.add_subparsers(dest="theory_command", required=True)

    escape = theory_commands.add_parser("escape", help="escape time from p0 to 1/2 for each q and p0")
    escape.add_argument("--q", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="q values")
    escape.add_argument(
        "--p0", type=float, nargs="+", default=[1e-3, 1e-4, 1e-5], help="starting success probabilities"
    )
    escape.add_argument("--num-answers", type=int, default=None, help="K answers (default round(1/p0): uniform start)")
    escape.add_argument(
        "--json", action="store_true", help="print a JSON list of {q, p0, escape_time} and nothing else"
    )
    escape.add_argument("--plot", default="outputs/theory/escape_time.png", help="where to write the PNG plot")
    escape.set_defaults(func=_theory_escape)

    noise = theory_commands.add_parser("noise", help="probability each q puts on wrong labels")
    noise.add_argument("--q", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="q values")
    noise.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3], help="shares of wrong labels, in (0, 0.5)")
    noise.add_argument("--horizon", type=float, default=1000.0, help="flow time T at which to read the probabilities")
    noise.add_argument("--num-answers", type=int, default=10, help="K answers of the shared softmax")
    noise.add_argument("--json", action="store_true", help="print JSON records and nothing else")
    noise.add_argument("--plot", default="outputs/theory/noise.png", help="where to write the PNG plot")
    noise.set_defaults(func=_theory_noise)

    from tsallis_core.config import describe_fields

    train = commands.add_parser(
        "train",
        help="train a model (stage sft or rl) from a YAML config with key=value overrides",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (set in the YAML file or as key=value):\n" + "\n".join(describe_fields()),
    )
    train.add_argument("--config", help="YAML config file (fields below); omitted: all defaults")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in output_dir (none there: an error); the optimiser "
        "settings given (optim.*) apply to the restored state; a changed stage, estimator, q, "
        "model, data file or optimizer is refused",
    )
    train.add_argument(
        "--resume-if-any",
        action="store_true",
        help="continue when output_dir holds a checkpoint, else start (what a restarted pod runs)",
    )
    train.add_argument(
        "--params",
        metavar="PARAMS_YAML",
        help="also set what params.yaml sets on every RL run of the DVC sweep (its train section: "
        "steps, optim.lr, rl.group_size, rl.batch_size, rl.max_new_tokens, rl.temperature; "
        "data.verifier; report.sweep: tracking.sweep); key=value overrides win",
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rl.q=0.5 optim.lr=3e-4")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("evaluate", help="pass@k, maj@k, accuracy, EM and F1 from n samples per prompt")
    _add_eval_arguments(evaluate, "outputs/evaluate/metrics.json")  # not outputs/eval: the report's input folder
    evaluate.add_argument("--n", type=int, default=16, help="samples per prompt")
    evaluate.add_argument("--k", type=int, nargs="+", default=[1, 4, 16], help="k values for pass@k and maj@k")
    evaluate.add_argument("--track", action="store_true", help="also log the metrics to MLflow")
    evaluate.set_defaults(func=_evaluate)

    diag = commands.add_parser("diagnose", help="estimate p0 and recommend an estimator, q and group size")
    _add_eval_arguments(diag, "outputs/evaluate/diagnosis.json")
    diag.add_argument("--m", type=int, default=8, help="samples per prompt (the group size to diagnose)")
    diag.add_argument(
        "--optimizer",
        default="adamw",
        help="the optimiser you train with: sgd, adamw or adamw_large_eps (a column of the simulator map)",
    )
    diag.add_argument(
        "--map",
        default="docs/simulate/results.json",
        help="the simulator map (tsallis simulate's results.json) the advice is read from",
    )
    diag.set_defaults(func=_diagnose)

    report = commands.add_parser(
        "report",
        help="the q-sweep report: table, plots, MLflow parent run, registry champion",
        description="Collect trained runs and their evaluations, pick the champion by --metric, register it in "
        "MLflow under --register-as with the alias 'champion', and write report.md, CSVs and PNG plots.",
    )
    report.add_argument(
        "--runs", nargs="+", required=True, help="training output directories, or directories holding them"
    )
    report.add_argument("--evals", required=True, help="directory of the evaluation JSONs, one <run name>.json per run")
    report.add_argument("--out", default="outputs/report", help="where the report goes")
    report.add_argument(
        "--metric", default="maj@8", help="evaluation metric that picks the champion (higher is better)"
    )
    report.add_argument(
        "--estimators", nargs="*", help="keep only the sweep runs of these estimators (GRPO runs are kept)"
    )
    report.add_argument("--q", nargs="*", type=float, help="keep only the sweep runs with these q values")
    report.add_argument("--seeds", nargs="*", type=int, help="keep only the runs with these seeds")
    report.add_argument(
        "--escape-threshold",
        type=float,
        default=ESCAPE_THRESHOLD,
        help="5-step mean training success that counts as escaped",
    )
    report.add_argument(
        "--register-as", default="", help="registered model name for the champion ('' : no registration)"
    )
    report.add_argument("--sweep", default="", help="sweep name: log to its MLflow parent run ('': no MLflow logging)")
    report.add_argument(
        "--simulate",
        default=None,
        help="a tsallis simulate output directory: its map and what it says about the claim go into the report",
    )
    report.set_defaults(func=_report)

    data = commands.add_parser("data", help="prepare datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synthetic = data_commands.add_parser(
        "synthetic",
        help="write the synthetic cold-start task (pretrain/train/test JSONL)",
        epilog="knobs (key=value): seed, p0, min_terms, max_terms, difficulty_spread, num_pretrain, num_train, num_test",
    )
    synthetic.add_argument("--out", default="data/synthetic", help="output directory")
    synthetic.add_argument("overrides", nargs="*", help="task knobs as key=value, e.g. p0=0.01")
    synthetic.set_defaults(func=_data_synthetic)

    from tsallis_core.data.registry import DATASETS, native_datasets

    prepare = data_commands.add_parser(
        "prepare",
        help=f"{' / '.join(native_datasets())} -> JSONL records with prompts (hub or local files)",
        epilog="datasets (tasks/registry.py; docs/datasets.md):\n"
        + "\n".join(
            f"  {DATASETS[n].name}: {DATASETS[n].description}; hub {DATASETS[n].hub_id}"
            f"{f' ({DATASETS[n].hub_config})' if DATASETS[n].hub_config else ''}, split {DATASETS[n].split}; "
            f"data.verifier={DATASETS[n].verifier}"
            for n in native_datasets()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("--dataset", required=True, choices=native_datasets())
    prepare.add_argument(
        "--path", help="local JSON/JSONL/Parquet file in the dataset's native schema (instead of the hub)"
    )
    prepare.add_argument("--hub-id", help="hub dataset id (default: the dataset's, below)")
    prepare.add_argument("--hub-config", help="hub config name (HotPotQA: distractor)")
    prepare.add_argument("--split", help="split (default: the dataset's evaluation split)")
    prepare.add_argument("--revision", help="hub revision: branch, tag or commit")
    prepare.add_argument(
        "--tokenizer", help="model whose tokenizer measures context length and gives the chat template"
    )
    prepare.add_argument("--max-context-tokens", type=int, help="truncate contexts to this many tokens")
    prepare.add_argument("--bad-rows", choices=["skip", "fail"], default="skip", help="skip and report, or fail")
    prepare.add_argument("--out", required=True, help="output JSONL")
    prepare.set_defaults(func=_data_prepare)
    task = data_commands.add_parser(
        "task",
        help="the pipelines' data from params.yaml's data section: pretrain, train, test JSONL (DVC stage prepare)",
        description="Sources: " + "; ".join(f"{s.name}: {s.description}" for s in DATASETS.values()),
    )
    task.add_argument("--params", default="params.yaml", help="params.yaml (its data section and warmup.model)")
    task.add_argument("--out", default="data/task", help="output directory")
    task.set_defaults(func=_data_task)
    track = commands.add_parser("track", help="MLflow tracking of finished runs")
    track_commands = track.add_subparsers(dest="track_command", required=True)
    sync = track_commands.add_parser(
        "sync",
        help="send what a run kept while its MLflow server was away (metrics, model, end of the run)",
        description="Sends <OUTPUT_DIR>/mlflow_spool.jsonl to the run in <OUTPUT_DIR>/mlflow.json, at "
        "$MLFLOW_TRACKING_URI or the URI recorded there; the run ends as it would have (FINISHED, KILLED).",
    )
    sync.add_argument("output_dir", metavar="OUTPUT_DIR", help="the training run's output_dir")
    sync.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    sync.set_defaults(func=_track_sync)
    for entry in entry_points(group="tsallis.commands"):  # commands of the application layer (tsallis_kubeflow/cli.py)
        entry.load()(commands)
    _add_study_commands(commands)
    from tsallis_core.studies.simulate import add_simulate_command

    add_simulate_command(commands)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides accepted anywhere after the command, before or after its
    options (``tsallis train rl.q=0.5 --resume steps=200``); argparse alone takes them as one block."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if extra and (len(overrides) < len(extra) or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pydantic import ValidationError

    from tsallis_core.tracking import TrackingUnreachable
    from tsallis_core.training.recipe import TrainingDiverged

    try:
        return args.func(args)
    except (ValueError, TrackingUnreachable, FileNotFoundError) as error:
        print(f"tsallis: error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:  # the run's numbers, not its settings' validity: exit 1
        print(f"tsallis: error: {error}", file=sys.stderr)
        return 1
    except ValidationError as error:
        print(f"tsallis: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
