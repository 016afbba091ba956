"""One kfp v2 lightweight component per stage of the cold-start sweep, each a thin wrapper over the tsallis_core
entry point that the same dvc.yaml stage calls (no logic lives only here).

The functions below are plain Python; ``build(image)`` turns them into components whose base image is the
project's image (``--image`` or ``$TSALLIS_IMAGE``; there is no default). The image has
tsallis_core, kfp and every dependency, so nothing is pip-installed when a step starts.
"""

from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def prepare_data(
    data: Output[Dataset],
    source: str,
    train_file: str,
    test_file: str,
    verifier: str,
    template: str,
    chat_template: bool,
    max_context_tokens: int,
    seed: int,
    p0: float,
    num_train: int,
    num_test: int,
    num_pretrain: int,
    model: str,
):
    """dvc.yaml prepare: params.yaml's data section -> the task folder (pretrain/train/test JSONL), from the synthetic
    generator, a published dataset (hub or local files in its original format) or your JSONL -> tasks.prepare.write_task."""
    from tsallis_core.prepare import TaskSettings, write_task

    task = TaskSettings(
        source=source,
        train_file=train_file,
        test_file=test_file,
        verifier=verifier,
        template=template,
        chat_template=chat_template,
        max_context_tokens=max_context_tokens,
        seed=seed,
        p0=p0,
        num_train=num_train,
        num_test=num_test,
        num_pretrain=num_pretrain,
    )
    write_task(task, data.path, model)
    data.metadata.update(task.model_dump())


def sweep_parent(experiment: str, sweep: str) -> str:
    """The sweep's MLflow parent run, created once before the parallel runs nest under it -> tracking.sweep_run_id."""
    import mlflow

    from tsallis_core.tracking import check_tracking_server, sweep_run_id

    check_tracking_server(mlflow.get_tracking_uri())
    return sweep_run_id(mlflow, experiment, sweep)


def sft_warmup(
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    base_model: str,
    steps: int,
    lr: float,
    batch_size: int,
    experiment: str,
    gpus: int,
    deepspeed_config: str,
    sweep: str = "",
    checkpoint_root: str = "",
    checkpoint_every: int = 0,
    pipeline_run: str = "",
):
    """dvc.yaml warmup: SFT of the base model on the pre-training corpus (steps=0: the model passes through)
    -> trainer.train(load_config("configs/base.yaml", overrides)), on all of the pod's GPUs; checkpoints under
    ``checkpoint_root`` (the cache PVC) every ``checkpoint_every`` steps, and a retried step resumes from them."""
    from tsallis_core.launch import run_training
    from tsallis_kubeflow.settings import checkpoint_path

    final = run_training(
        "configs/base.yaml",
        [
            f"output_dir={model.path}",
            f"model.name_or_path={base_model}",
            f"steps={steps}",
            f"optim.lr={lr}",
            f"sft.batch_size={batch_size}",
            f"data.train_path={data.path}/pretrain.jsonl",
            f"tracking.experiment={experiment}",
            "tracking.log_model=false",
            f"checkpoint_every={checkpoint_every}",
            "keep_checkpoints=2",
        ],
        gpus,
        deepspeed_config,
        checkpoint_path(checkpoint_root, sweep, pipeline_run, "warmup"),
    )
    for key, value in final.items():
        metrics.log_metric(key, value)


def train_rl(
    data: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    run_name: str,
    estimator: str,
    q: str,
    seed: str,
    steps: int,
    lr: float,
    group_size: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    sweep: str,
    experiment: str,
    gpus: int,
    deepspeed_config: str,
    verifier: str = "exact",
    checkpoint_root: str = "",
    checkpoint_every: int = 0,
    pipeline_run: str = "",
):
    """dvc.yaml train/baseline: one RL run of the sweep, nested under the sweep's MLflow parent run
    -> trainer.train(load_config("configs/rl.yaml", overrides)); torchrun + DeepSpeed when gpus > 1. Checkpoints
    go to <checkpoint_root>/<sweep>/<pipeline_run>/<run_name> (the cache PVC); a retried step resumes there."""
    from tsallis_core.launch import run_training
    from tsallis_core.params import sweep_run_overrides
    from tsallis_kubeflow.settings import checkpoint_path

    final = run_training(
        "configs/rl.yaml",
        [
            f"output_dir={model.path}/{run_name}",
            f"model.name_or_path={base_model.path}/model",
            f"data.train_path={data.path}/train.jsonl",
            *sweep_run_overrides(
                run_name,
                estimator,
                q,
                seed,
                steps,
                lr,
                group_size,
                batch_size,
                max_new_tokens,
                temperature,
                sweep,
                experiment,
                checkpoint_every,
                verifier,
            ),
        ],
        gpus,
        deepspeed_config,
        checkpoint_path(checkpoint_root, sweep, pipeline_run, run_name),
    )
    model.metadata.update({"run_name": run_name, "estimator": estimator, "q": float(q), "seed": int(seed)})
    for key, value in final.items():
        metrics.log_metric(key, value)


def train_rl_trainjob(
    data: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
    run_name: str,
    estimator: str,
    q: str,
    seed: str,
    steps: int,
    lr: float,
    group_size: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    sweep: str,
    experiment: str,
    cluster: dict,
    verifier: str = "exact",
    pipeline_run: str = "",
):
    """train_rl across nodes: submits a Kubeflow Trainer TrainJob that runs the same `tsallis train` on
    cluster["num_nodes"] nodes, waits, and fails with the job's error -> launch.run_trainjob. The run's staging
    is <cache>/trainjobs/<sweep>/<pipeline_run>/<run_name>: a retried launcher resumes from its checkpoints."""
    from tsallis_core.params import sweep_run_overrides
    from tsallis_kubeflow.settings import ClusterSettings, checkpoint_path
    from tsallis_kubeflow.trainjob import run_trainjob

    final = run_trainjob(
        "configs/rl.yaml",
        sweep_run_overrides(
            run_name,
            estimator,
            q,
            seed,
            steps,
            lr,
            group_size,
            batch_size,
            max_new_tokens,
            temperature,
            sweep,
            experiment,
            cluster["checkpoint_every"],
            verifier,
        ),
        data.path,
        f"{base_model.path}/model",
        model.path,
        run_name,
        ClusterSettings.model_validate(cluster),
        work_dir=checkpoint_path(f"{cluster['cache_path']}/trainjobs", sweep, pipeline_run, run_name),
    )
    model.metadata.update({"run_name": run_name, "estimator": estimator, "q": float(q), "seed": int(seed)})
    for key, value in final.items():
        metrics.log_metric(key, value)


def evaluate_model(
    data: Input[Dataset],
    model: Input[Model],
    metrics: Output[Metrics],
    evaluation: Output[Artifact],
    run_name: str,
    n: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    verifier: str = "exact",
):
    """dvc.yaml evaluate: n samples per held-out prompt scored by ``verifier``, pass@k and maj@k for k in (1, n)
    -> evaluate.evaluate_model; the JSON goes to evaluation/<run_name>.json as `tsallis evaluate --out` writes it."""
    from tsallis_core.evaluation.evaluate import evaluate_model, write_json

    record = evaluate_model(
        f"{model.path}/{run_name}/model",
        f"{data.path}/test.jsonl",
        n,
        [1, n],
        verifier,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    write_json(record, f"{evaluation.path}/{run_name}.json")
    for key, value in record["metrics"].items():
        metrics.log_metric(key.replace("@", "_at_"), value)


def register_champion(
    models: Input[list[Model]], evaluations: Input[list[Artifact]], metric: str, registered_model: str
) -> dict:
    """dvc.yaml report (its registry half): pick the champion by `metric`, register it in MLflow with the alias
    `champion` -> sweep.load_runs, pick_champion, register_champion."""
    from tsallis_core.studies import sweep

    runs = sweep.load_runs([m.path for m in models], [e.path for e in evaluations])
    return sweep.register_champion(sweep.pick_champion(runs, metric), registered_model, metric)


def sweep_report(
    models: Input[list[Model]],
    evaluations: Input[list[Artifact]],
    registered: dict,
    metric: str,
    escape_threshold: float,
    sweep_name: str,
    experiment: str,
    report: Output[Markdown],
    report_files: Output[Artifact],
    summary: Output[Metrics],
):
    """dvc.yaml report: the table, CSVs and plots, and the evaluations on the MLflow sweep run
    -> sweep.load_runs, pick_champion, write_report, log_sweep."""
    import shutil

    from tsallis_core.studies import sweep

    runs = sweep.load_runs([m.path for m in models], [e.path for e in evaluations])
    champion = sweep.pick_champion(runs, metric)
    paths = sweep.write_report(runs, champion, report_files.path, metric, escape_threshold, registered or None)
    sweep.log_sweep(runs, sweep_name, report_files.path, champion, metric, experiment)
    shutil.copyfile(paths["report"], report.path)
    summary.log_metric(metric.replace("@", "_at_"), champion.metric(metric))
    summary.log_metric("runs", len(runs))


STAGES = (
    prepare_data,
    sweep_parent,
    sft_warmup,
    train_rl,
    train_rl_trainjob,
    evaluate_model,
    register_champion,
    sweep_report,
)


def build(image: str | None = None) -> SimpleNamespace:
    """The stages as kfp components on ``image`` (default: $TSALLIS_IMAGE; neither: ConfigError)."""
    from tsallis_kubeflow.settings import default_image, require_image

    image = require_image(image or default_image())
    return SimpleNamespace(
        **{
            stage.__name__: dsl.component(stage, base_image=image, install_kfp_package=False, packages_to_install=[])
            for stage in STAGES
        }
    )
