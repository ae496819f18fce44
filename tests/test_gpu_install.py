"""The GPU install: constraints/gpu.txt (torch, cuCIM, cupy of one CUDA major) is what the image and the cluster
configs install, and pip resolves it to the torch we test (no GPU needed to resolve).

The resolver dry run asks the package index (~3 min): `pytest -m gpu_install`; the rest is cheap and always runs.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU, CPU = REPO / "constraints" / "gpu.txt", REPO / "constraints" / "cpu.txt"
CUDA_MAJOR = "13"  # the CUDA major we support: PyPI's torch 2.14.1 is a CUDA 13.0 build


def pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a constraints file."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return dict(line.split("==") for line in lines if "==" in line)


def test_gpu_constraints_pin_the_tested_torch_and_ray_with_one_cuda_major():
    gpu, cpu = pins(GPU), pins(CPU)
    for name in ("torch", "torchvision", "timm", "ray", f"cucim-cu{CUDA_MAJOR}"):  # the versions the suite runs
        assert gpu[name] == cpu[name], name
    assert f"cupy-cuda{CUDA_MAJOR}x" in gpu and gpu["cuda-toolkit"].startswith(f"{CUDA_MAJOR}.")
    for path, pinned in ((GPU, gpu), (CPU, cpu)):  # the CPU set runs PyPI's CUDA torch too: one major in each
        other = [name for name in pinned if re.search(r"cu(da)?1[0-9]", name) and CUDA_MAJOR not in name]
        assert not other, f"packages of another CUDA major in {path.name}: {other}"


def test_cucim_is_an_extra_per_cuda_major_not_a_hard_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("cucim")]  # a hard cu12 could not meet cu13 torch
    extras = project["optional-dependencies"]
    assert extras["cu12"][0].startswith("cucim-cu12") and extras["cu13"][0].startswith("cucim-cu13")
    assert f"hnm-ray[cu{CUDA_MAJOR}]" in extras["test"]  # CI (constraints/cpu.txt: a CUDA 13 torch) keeps its cuCIM
    assert "hnm-ray[timm]" in extras["test"] and extras["timm"][0].startswith("timm")  # the timm path is tested


@pytest.mark.parametrize("path", ["cluster/Dockerfile", "cluster/aws.yaml", "cluster/gcp.yaml"])
def test_image_and_launcher_install_the_gpu_constraints(path):
    text = (REPO / path).read_text()
    install = next(line for line in text.replace("\\\n", " ").splitlines()
                   if "pip install" in line and "-e" in line and not line.lstrip().startswith("#"))
    assert "constraints/gpu.txt" in install and f"cu{CUDA_MAJOR}" in install, install


@pytest.mark.gpu_install
@pytest.mark.timeout(900)
def test_gpu_install_resolves_to_the_tested_torch_and_cuda(tmp_path):
    """pip's resolver on the image's install set: torch 2.14.1 (not a CPU wheel, not an older CUDA 12 torch) with
    cuCIM, cupy and the CUDA libraries of one CUDA major. Local wheel folders (find-links, a CPU torch) are off."""
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_FIND_LINKS")}
    env["PIP_CONFIG_FILE"] = os.devnull
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-c", str(GPU), f"{REPO}[cu{CUDA_MAJOR},openslide,timm]",
                           f"ray[default]=={pins(GPU)['ray']}"], env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    for name in ("torch", "torchvision", "timm"):  # no "+cpu" local wheel, no older torch picked to fit
        assert got[name] == pins(GPU)[name], name
    assert got[f"cucim-cu{CUDA_MAJOR}"] == pins(GPU)[f"cucim-cu{CUDA_MAJOR}"]
    assert got[f"cupy-cuda{CUDA_MAJOR}x"] == pins(GPU)[f"cupy-cuda{CUDA_MAJOR}x"]
    assert got["nvidia-cuda-runtime"].startswith(f"{CUDA_MAJOR}.") and got["cuda-toolkit"].startswith(f"{CUDA_MAJOR}.")
    other = sorted(n for n in got if re.search(r"(-cu|cuda)1[0-9]", n) and not re.search(f"(-cu|cuda){CUDA_MAJOR}", n))
    assert not other, f"libraries of another CUDA major resolved: {other}"
