"""The image's dependencies, tested: docker/requirements.txt inside pyproject's ranges, the tested torch in the
Dockerfile, and a fresh virtual environment built from those pins that installs, imports, compiles and trains."""

import os
import subprocess
import sys

import tomllib
import torch
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE_EXTRAS = ("deepspeed", "kubeflow")  # what the Dockerfile installs: ".[deepspeed,kubeflow]"


def pins() -> dict[str, str]:
    lines = (REPO / "docker" / "requirements.txt").read_text().splitlines()
    found = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the image pins exact versions"
            found[canonicalize_name(req.name)] = spec.version
    return found


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for extra in IMAGE_EXTRAS for r in project["optional-dependencies"][extra]]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_every_pin_is_inside_pyprojects_ranges_and_every_dependency_is_pinned():
    pinned = pins()
    for req in pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} ({req}) has no pin in docker/requirements.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"docker/requirements.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req}"
        )


def test_the_image_installs_the_torch_the_tests_run():
    assert pins()["torch"] == torch.__version__.split("+")[0]
    dockerfile = (REPO / "Dockerfile").read_text()
    base = next(line for line in dockerfile.splitlines() if line.startswith("FROM "))
    assert "pytorch" not in base, f"{base}: a torch base image brings its own torch"


def test_a_fresh_venv_from_the_image_pins_installs_imports_compiles_and_trains(tmp_path):
    """What the image's build does, in a new virtual environment with the CPU build of the same torch: install the
    pins and the package (not editable), pip check, import every module, compile the pipeline, train 2 steps."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"TQDM_DISABLE": "1"}

    def run(*argv, cwd=tmp_path, timeout=1200):
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        assert result.returncode == 0, f"{' '.join(map(str, argv))}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    run(sys.executable, "-m", "venv", venv)
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    requirements = REPO / "docker" / "requirements.txt"
    package = f"{REPO}[{','.join(IMAGE_EXTRAS)}]"  # as the Dockerfile installs it: not editable
    run(pip, "install", "-q", "--no-compile", "-r", requirements, "--constraint", requirements, package)
    run(pip, "check")
    imported = run(
        python,
        "-c",
        "import importlib, pkgutil, tsallis_core as t\n"
        "names = [m.name for m in pkgutil.walk_packages(t.__path__, 'tsallis_core.')]\n"
        "[importlib.import_module(n) for n in names]\n"
        "print(t.__file__, len(names))",
    )
    assert str(venv) in imported.stdout  # the installed package, not the checkout
    tsallis = venv / "bin" / "tsallis"
    run(tsallis, "pipeline", "compile", "--image", "tsallis:local", "--out", tmp_path / "pipeline.yaml", cwd=REPO)
    assert "tsallis:local" in (tmp_path / "pipeline.yaml").read_text()
    run(tsallis, "data", "synthetic", "--out", tmp_path / "data", "num_pretrain=64", "num_train=8", "num_test=8")
    trained = run(
        tsallis,
        "train",
        "stage=sft",
        "steps=2",
        f"output_dir={tmp_path / 'run'}",
        "sft.batch_size=8",
        f"data.train_path={tmp_path / 'data' / 'pretrain.jsonl'}",
        "tracking.enabled=false",
    )
    assert "done:" in trained.stdout and (tmp_path / "run" / "model" / "model.safetensors").is_file()
