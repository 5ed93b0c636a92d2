"""The Docker images: the Dockerfiles, .dockerignore, the package build of the install step, the entrypoints."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from .deploy.common import ROOT
from .deploy.dockerfiles import DOCKERFILES, dockerfile, dockerignored, instructions, makefile_torch_pin


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfile_basics(name) -> None:
    froms = instructions(name, "FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    ref, _, digest = image.partition("@")
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
    assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"base not pinned to an exact version: {image}"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"base not pinned by digest: {image}"
    user = instructions(name, "USER")[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"runs as {user!r}"
    # the user comes after everything that needs root
    kinds = [i["instruction"] for i in dockerfile(name)]
    assert "RUN" not in kinds[kinds.index("USER") :]
    args = dict(a.split("=", 1) for a in instructions(name, "ARG"))
    assert args["TORCH"].strip('"') == makefile_torch_pin(), "keep the torch pin equal to the Makefile's"
    env = " ".join(instructions(name, "ENV"))
    assert "TORCH_HOME=/cache/torch" in env and "HF_HOME=/cache/hf" in env
    # every COPY source is in the repository and inside the build context
    for value in instructions(name, "COPY"):
        sources = [w for w in value.split() if not w.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"


@pytest.mark.parametrize("name", ["reward", "reward-cpu"])
def test_reward_dockerfiles(name) -> None:
    health = instructions(name, "HEALTHCHECK")
    assert len(health) == 1 and "mrc-healthcheck" in health[0] and "--start-period=" in health[0]
    assert instructions(name, "EXPOSE") == ["8080"]
    assert json.loads(instructions(name, "CMD")[-1]) == ["mrc", "serve", "--host", "0.0.0.0"]
    assert json.loads(instructions(name, "ENTRYPOINT")[-1]) == ["/usr/local/bin/mrc-entrypoint"]
    assert json.loads(instructions(name, "VOLUME")[-1]) == ["/cache"]
    args = dict(a.split("=", 1) for a in instructions(name, "ARG"))
    assert args["FETCH_WEIGHTS"] == '""', "weights are baked only when asked for with --build-arg FETCH_WEIGHTS"
    run = "\n".join(instructions(name, "RUN"))
    assert 'if [ -n "$FETCH_WEIGHTS" ]' in run and "useradd --uid 10001" in run
    if name == "reward-cpu":
        assert "python:3.11" in instructions(name, "FROM")[0] and "whl/cpu" in args["TORCH_INDEX_URL"]
    else:
        assert instructions(name, "FROM")[0].startswith("nvidia/cuda:13.0.")  # torch 2.14.1 is built for CUDA 13.0


def test_trainer_dockerfile_installs_the_trainer_when_present() -> None:
    run = "\n".join(instructions("trainer", "RUN"))
    assert "if [ -f /opt/mrc/src/services/trainer/pyproject.toml ]" in run
    assert "pip install /opt/mrc/src/services/reward" in run
    assert json.loads(instructions("trainer", "CMD")[-1])[:2] == ["carve3d-train", "train"]


def test_dockerignore_keeps_local_state_out() -> None:
    for path in (".venv", ".git", "out/demo/x.png", "services/reward/carve3d_reward/__pycache__/a.pyc",
                 "services/reward/carve3d_reward.egg-info", ".pytest_cache", ".ruff_cache"):  # fmt: skip
        assert dockerignored(path), path
    for path in ("services/reward/pyproject.toml", "services/reward/carve3d_reward/cli.py", "docker/entrypoint.sh"):
        assert not dockerignored(path), path


@pytest.mark.slow
def test_the_image_install_step_builds_the_package(tmp_path) -> None:
    """Stage services/reward as the Dockerfile's COPY does (.dockerignore applied, no README.md beside it) and
    build it the way `pip install` in the image does, minus the network (no dependencies, no build isolation)."""
    src = tmp_path / "opt" / "mrc" / "src" / "services" / "reward"
    for path in (ROOT / "services" / "reward").rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not dockerignored(rel):
            dest = src / path.relative_to(ROOT / "services" / "reward")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    out = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "w"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("carve3d_reward-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "carve3d_reward/service/app.py" in names and "carve3d_reward/cli.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "mrc = carve3d_reward.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- the entrypoint: what it fetches, decided without a network ------------------------------------------------------
@pytest.fixture
def fake_mrc(tmp_path) -> tuple[Path, dict[str, str]]:
    """A PATH whose `mrc` records its arguments instead of downloading."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "mrc.log"
    (bindir / "mrc").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bindir / "mrc").chmod(0o755)
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "TORCH_HOME": str(tmp_path / "cache" / "torch"),
        "MRC_BAKED_WEIGHTS": str(tmp_path / "baked"),
    }
    return log, env


def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    script = ROOT / "docker" / "entrypoint.sh"
    return subprocess.run(["sh", str(script), *command], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("extra", "fetched"),
    [
        ({}, []),
        ({"MRC_DISTANCE": "ssim"}, []),
        ({"MRC_DISTANCE": "lpips-alex"}, ["weights fetch --lpips alex"]),
        ({"MRC_DISTANCE": "lpips-vgg", "FETCH_WEIGHTS": "auto"}, ["weights fetch --lpips vgg"]),
        ({"MRC_DISTANCE": "lpips-alex", "MRC_LPIPS_TRUNK_PATH": "/w/alex.pth"}, []),
        ({"MRC_DISTANCE": "lpips-alex", "FETCH_WEIGHTS": "none"}, []),
        ({"FETCH_WEIGHTS": "lpips-alex,lpips-vgg"}, ["weights fetch --lpips alex", "weights fetch --lpips vgg"]),
        (
            {"MRC_RECONSTRUCTOR": "lrm", "MRC_DISTANCE": "lpips-alex"},
            ["weights fetch --lpips alex", "weights fetch --lrm instant-nerf-large"],
        ),
        (
            {"MRC_RECONSTRUCTOR": "lrm", "MRC_LRM_PRESET": "instant-nerf-base"},
            ["weights fetch --lrm instant-nerf-base"],
        ),
        ({"MRC_RECONSTRUCTOR": "lrm", "MRC_LRM_CHECKPOINT": "/w/lrm.ckpt"}, []),
    ],
)
def test_entrypoint_fetches_what_the_metric_needs(fake_mrc, extra, fetched) -> None:
    log, env = fake_mrc
    out = _entrypoint({**env, **extra}, "mrc", "serve", "--host", "0.0.0.0")
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == [*fetched, "serve --host 0.0.0.0"]  # then execs the command


def test_entrypoint_rejects_unknown_weights_and_seeds_baked_ones(fake_mrc, tmp_path) -> None:
    _, env = fake_mrc
    out = _entrypoint({**env, "FETCH_WEIGHTS": "bogus"}, "true")
    assert out.returncode == 2 and "unknown entry 'bogus'" in out.stderr
    baked = tmp_path / "baked" / "hub" / "checkpoints"
    baked.mkdir(parents=True)
    (baked / "alexnet-owt-7be5be79.pth").write_bytes(b"weights")
    out = _entrypoint(env, "true")
    assert out.returncode == 0, out.stderr
    seeded = tmp_path / "cache" / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    assert seeded.read_bytes() == b"weights"


def test_trainer_entrypoint_without_the_trainer(tmp_path) -> None:
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "MRC_URL": "http://reward:8080"}
    script = ROOT / "docker" / "trainer-entrypoint.sh"
    out = subprocess.run(["sh", str(script), "carve3d-train"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 78 and "not installed" in out.stderr


def test_triton_image_carries_our_package_and_model_repository() -> None:
    """The stock tritonserver image lacks torch and carve3d_reward: compose and k8s use our own on top of it."""
    from dockerfile_parse import DockerfileParser

    parsed = [i for i in DockerfileParser(path=str(ROOT / "docker" / "triton.Dockerfile")).structure]

    def values(kind: str) -> list[str]:
        return [i["value"] for i in parsed if i["instruction"] == kind]

    base = values("FROM")[0]
    assert base.startswith("nvcr.io/nvidia/tritonserver:") and re.search(r":\d{2}\.\d{2}-py3$", base)
    args = dict(a.split("=", 1) for a in values("ARG"))
    assert args["TORCH"].strip('"') == makefile_torch_pin()
    run = "\n".join(values("RUN"))
    assert "pip install /opt/mrc/src/services/reward" in run and "import carve3d_reward.model" in run
    assert any("services/reward/triton/model_repository /models" in v for v in values("COPY"))
    kinds = [i["instruction"] for i in parsed if i["instruction"] != "COMMENT"]
    assert values("USER")[-1].split(":")[0] == "10001" and "RUN" not in kinds[kinds.index("USER") :]
    assert "/v2/health/ready" in values("HEALTHCHECK")[0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["triton"]["build"]["dockerfile"] == "docker/triton.Dockerfile"
    overlay = (ROOT / "k8s" / "overlays" / "triton" / "deployment.yaml").read_text()
    assert "carve3d/mrc-triton:0.1.0" in overlay and "nvcr.io/nvidia/tritonserver" not in overlay
