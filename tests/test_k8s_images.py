"""k8s/images/: the Dockerfiles are well formed and agree with the project and manifests.

docker cannot build here; these checks read the files: instructions known to Docker, a
non-root final user, the CUDA settings the op build needs, build-context ignore files that
keep environments and data out, and versions that match pyproject.toml and the RayJobs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "k8s" / "images"
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
                "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
DOCKERFILES = sorted(p for p in IMAGES.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def args_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for keyword, rest in steps:
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            out[key] = value.strip('"')
    return out


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.train", "Dockerfile.ray"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_well_formed(path: Path) -> None:
    steps = instructions(path)
    keywords = [k for k, _ in steps]
    assert set(keywords) <= INSTRUCTIONS, set(keywords) - INSTRUCTIONS
    first = next(i for i, k in enumerate(keywords) if k != "ARG")
    assert keywords[first] == "FROM", "only ARG may come before FROM"
    users = [rest for k, rest in steps if k == "USER"]
    assert users and users[-1].split(":")[0] in ("1000",), "the image must end as uid 1000 (runAsUser)"
    for keyword, rest in steps:
        if keyword == "COPY":
            sources = shlex.split(rest)[:-1]
            for src in sources:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"COPY source {src} missing"
        if keyword == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
        if keyword in ("CMD", "ENTRYPOINT"):
            assert rest.startswith("["), f"{keyword} in exec form"
    ignore = path.with_name(path.name + ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "outputs"):
        assert entry in ignore, f"{path.name}.dockerignore must exclude {entry}"


def test_training_image_builds_the_cuda_op() -> None:
    steps = instructions(IMAGES / "Dockerfile.train")
    text = " ".join(rest for _, rest in steps)
    args = args_of(steps)
    assert "devel" in next(rest for k, rest in steps if k == "FROM"), "nvcc needs a CUDA devel base"
    assert "CUDA_HOME=/usr/local/cuda" in text
    assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in text
    archs = args["TORCH_CUDA_ARCH_LIST"].split(";")
    assert all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in archs), archs
    assert "DINO_SCALE_BUILD_CUDA=1" in text, "a build without the CUDA kernel must fail"
    assert "import dino_scale.ops._C" in text
    assert "pip install --no-build-isolation -e ." in text


def test_versions_agree_with_project_and_manifests() -> None:
    makefile = (REPO / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= (.+)$", makefile, re.M).group(1).strip()
    for path in DOCKERFILES:
        assert args_of(instructions(path))["TORCH_SPEC"] == torch_spec, path.name
    ray_image = args_of(instructions(IMAGES / "Dockerfile.ray"))["RAY_IMAGE"]
    ray_version = re.search(r":(\d+\.\d+\.\d+)-", ray_image).group(1)
    pyproject = (REPO / "pyproject.toml").read_text()
    low, high = re.search(r'"ray\[default\]>=([\d.]+),<([\d.]+)"', pyproject).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(ray_version) < as_tuple(high)
    rayjob = yaml.safe_load((REPO / "k8s/base/build-shards/o365/rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
