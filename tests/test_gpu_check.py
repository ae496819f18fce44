"""benchmarks/gpu_check.sh, the first run on a lent GPU: its CPU dry run (every step says "no GPU", exit 0)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _steps_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_runs_every_check_within_ten_minutes():
    text = SCRIPT.read_text()
    entries = re.search(r"for entry in ([\w: ]+); do", text).group(1).split()
    limits = {name: int(seconds) for name, seconds in (e.split(":") for e in entries)}
    assert list(limits) == list(_steps_module().STEPS)  # every step of gpu_check.py, in its order
    probe = int(re.search(r"timeout -k 10 (\d+) .* probe", text).group(1))
    # the steps' limits, the probe's and 10 s a process to be killed after its limit fit in 10 minutes
    assert sum(limits.values()) + probe + 10 * (len(limits) + 1) <= 600


@pytest.mark.timeout(120)
def test_dry_run_without_a_gpu_says_so_for_every_step_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_check.sh itself")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "GPU_CHECK_OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["step"] == "start" and lines[0]["date"]
    assert [(line["step"], line["status"]) for line in lines[1:]] == [(s, "no GPU") for s in _steps_module().STEPS]
