"""``tsallis pipeline``: the Kubeflow commands, in the application layer (the ``tsallis`` command finds them
through the entry point ``tsallis.commands``; tsallis_core never imports this package)."""

from __future__ import annotations

import argparse


def _pipeline_settings(args: argparse.Namespace, local: bool = False):
    from tsallis_kubeflow.settings import load_settings, local_settings

    from . import cold_start_sweep as module

    overrides = [*([f"cluster.image={args.image}"] if args.image else []), *args.overrides]
    settings = local_settings(args.params, overrides) if local else load_settings(args.params, overrides)
    return module, settings


def _pipeline_compile(args: argparse.Namespace) -> int:
    module, settings = _pipeline_settings(args)
    path = module.compile_pipeline(settings, args.out)
    runs = settings.sweep.items()
    print(
        f"{path}: {len(runs)} training runs ({', '.join(r['run_name'] for r in runs)}), parallelism "
        f"{settings.parallelism or 'unlimited'}, image {settings.cluster.image}, {settings.cluster.num_nodes} node(s) x "
        f"{settings.cluster.gpus_per_node} GPU(s) per run"
    )
    return 0


def _pipeline_submit(args: argparse.Namespace) -> int:
    from tsallis_kubeflow.settings import parse_params

    module, settings = _pipeline_settings(args)
    run_id = module.submit(
        settings, args.host, parse_params(args.param), args.experiment, args.run_name, args.namespace
    )
    print(f"submitted run {run_id} to {args.host} (experiment {args.experiment!r})")
    return 0


def _pipeline_run_local(args: argparse.Namespace) -> int:
    from tsallis_kubeflow.settings import parse_params

    module, settings = _pipeline_settings(args, local=True)
    report = module.run_local(settings, args.workdir, parse_params(args.param))
    print(f"report: {report}")
    return 0


def add_pipeline_commands(commands) -> None:
    """``tsallis pipeline compile | submit | run-local``: registered with the ``tsallis`` command through the entry
    point group ``tsallis.commands`` (pyproject.toml), so that the library never imports this layer."""
    pipeline = commands.add_parser(
        "pipeline",
        help="the Kubeflow cold-start sweep: compile, submit, run locally",
        description="Settings come from params.yaml plus key=value overrides (sweep.q=[0.5,1.0], "
        "sweep.estimators=[garl], parallelism=2, cluster.gpus_per_node=8, cluster.num_nodes=2, ...; "
        "see tsallis_kubeflow/settings.py); --param name=value sets a run-time parameter (train_steps=30).",
    )
    sub = pipeline.add_subparsers(dest="pipeline_command", required=True)
    for name, func, help_text in (
        ("compile", _pipeline_compile, "write the pipeline YAML"),
        ("submit", _pipeline_submit, "compile and submit a run to Kubeflow Pipelines (kfp.Client)"),
        (
            "run-local",
            _pipeline_run_local,
            "run the whole pipeline here (kfp.local, SubprocessRunner) on small settings",
        ),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--params", default="params.yaml", help="params.yaml whose sections give the defaults")
        cmd.add_argument(
            "--image",
            help="not used: kfp.local runs every step as a subprocess here"
            if name == "run-local"
            else "image of every step (default: $TSALLIS_IMAGE; one of them is required)",
        )
        cmd.add_argument("overrides", nargs="*", help="settings as key=value, e.g. sweep.q=[0.25,0.75]")
        cmd.set_defaults(func=func)
        if name == "compile":
            cmd.add_argument("--out", default="outputs/kubeflow/cold_start_sweep.yaml", help="where to write the YAML")
        else:
            cmd.add_argument("--param", action="append", default=[], help="run-time parameter name=value (repeatable)")
        if name == "submit":
            cmd.add_argument("--host", required=True, help="Kubeflow Pipelines API, e.g. http://localhost:8080")
            cmd.add_argument("--experiment", default="tsallis", help="Kubeflow experiment")
            cmd.add_argument("--run-name", help="run name (default: Kubeflow's)")
            cmd.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")
        if name == "run-local":
            cmd.add_argument("--workdir", default="outputs/kubeflow-local", help="where the steps' outputs go")
