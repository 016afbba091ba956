"""The README against the code: its module table names every module of the package (read from the package at test
time), and every command in its bash blocks is checked by a dry run of the tool's own parser and of the settings it
would validate (tsallis, deepspeed, torchrun, dvc), or is one of the commands that need the network, a cluster or
an image (pip, docker, kubectl, ...), which no test here can run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import REPO

README = (REPO / "README.md").read_text()
# the install (network), the suite itself, the image and the cluster, a server, the shell
NEEDS_OUTSIDE = {"pip", "python3", "python", "ruff", ".", "docker", "kubectl", "export", "mlflow", "mkdir", "cp"}
MODEL = "Qwen/Qwen2.5-1.5B-Instruct"  # $M in the README


def module_table() -> str:
    section = README.split("## What is inside", 1)[1]
    return "\n".join(line for line in section.splitlines() if line.startswith("|"))


def test_module_table_names_every_module_of_the_package():
    listed = set(re.findall(r"`(tsallis_core/[\w/.]+)`", module_table()))
    assert listed, "no tsallis_core paths in the README's module table"
    missing_files = sorted(p for p in listed if not (REPO / p.rstrip("/")).exists())
    assert not missing_files, f"the README's module table lists paths that do not exist: {missing_files}"
    folders = [p for p in listed if p.endswith("/")]
    modules = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tsallis_core").rglob("*.py")
        if p.name != "__init__.py" and "assets" not in p.parts
    )
    unlisted = [m for m in modules if m not in listed and not any(m.startswith(f) for f in folders)]
    assert not unlisted, f"modules missing from the README's module table: {unlisted}"


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined, comments and heredoc bodies dropped,
    ``a && b`` split, ``$M`` and ``$PWD`` substituted."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        block = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", block, flags=re.DOTALL)  # kubectl apply -f - <<'YAML' ... YAML
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.replace("$M", MODEL).replace("$PWD", str(REPO)), comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word == "&&":
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(word)
    return commands


def check_tsallis(argv: list[str]) -> None:
    from tsallis_core.cli import parse_args
    from tsallis_core.config import load_config
    from tsallis_kubeflow.settings import check_params, load_settings, parse_params

    args = parse_args(argv)  # argparse exits on an unknown option or a missing argument
    if args.command == "train":
        overrides = [o for o in args.overrides if not o.startswith(("data.train_path=", "model.name_or_path="))]
        load_config(REPO / args.config if args.config else None, overrides)
    if args.command == "pipeline":
        settings = load_settings(REPO / "params.yaml", args.overrides)
        check_params(settings, parse_params(getattr(args, "param", [])))
    if args.command == "data" and args.data_command == "prepare" and args.path:
        assert Path(args.path).is_file(), args.path


def check_dvc(argv: list[str]) -> None:
    from dvc.cli import parse_args

    from benchmarks.dvc_repro import set_param
    from tsallis_kubeflow.settings import PipelineSettings

    args = parse_args(argv)
    if getattr(args, "set_param", None):
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        for assignment in args.set_param:
            set_param(params, assignment)
        PipelineSettings.model_validate({k: v for k, v in params.items() if k in PipelineSettings.model_fields})
        # every section validated, the data section's source, files, template and verifier included


def test_every_readme_command_parses_and_its_settings_validate(monkeypatch):
    monkeypatch.setenv("TSALLIS_IMAGE", "registry.example/tsallis:readme")
    checked = {}
    for argv in readme_commands():
        tool = argv[0].removeprefix(".venv/bin/")
        if tool == "tsallis":
            check_tsallis(argv[1:])
        elif tool == "deepspeed":
            from deepspeed.launcher.runner import parse_args

            launch = parse_args(argv[1:])  # `-m` instead of --module stops here: "unrecognized arguments: -m"
            assert launch.module and launch.user_script == "tsallis_core.cli", argv
            check_tsallis(launch.user_args)
        elif tool == "torchrun":
            from torch.distributed.run import get_args_parser

            launch = get_args_parser().parse_args(argv[1:])
            assert launch.module and launch.training_script == "tsallis_core.cli", argv
            check_tsallis(launch.training_script_args)
        elif tool == "dvc":
            check_dvc(argv[1:])
        elif "=" in tool and tool.split("=")[0].isupper():  # M=Qwen/...: a shell variable
            continue
        else:
            assert tool in NEEDS_OUTSIDE, f"README command {' '.join(argv)!r}: no dry run for {tool!r}"
        checked[tool] = checked.get(tool, 0) + 1
    assert checked["tsallis"] >= 20 and checked["deepspeed"] == 2 and checked["dvc"] >= 8


def test_deepspeed_refuses_dash_m_so_the_readme_uses_module():
    from deepspeed.launcher.runner import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--num_gpus", "8", "-m", "tsallis_core.cli", "train"])
    assert " -m tsallis_core.cli" not in " ".join(line for line in README.splitlines() if "deepspeed" in line)
