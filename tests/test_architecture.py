"""The README's architecture table and flag list stay true: every module it names exists, every flag it names parses."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from hnm_ray.train import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
REPO = Path(__file__).resolve().parents[1]


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_every_module_in_the_architecture_table_exists():
    table = [line for line in _section("Architecture").splitlines() if line.startswith("| `hnm_ray")]
    paths = [p for line in table for p in re.findall(r"`(hnm_ray/[^`]+)`", line.split("|")[1])]
    assert len(paths) >= 15, paths
    for path in paths:
        assert (REPO / path).exists(), path
    for line in table:  # a folder's row names its files: each of them exists in that folder
        folder = re.findall(r"`(hnm_ray/[^`]+/)`", line.split("|")[1])
        for name in re.findall(r"`([a-z_0-9]+\.py)`", line.split("|")[2]) if folder else []:
            assert (REPO / folder[0] / name).exists(), (folder[0], name)


def test_the_top_of_the_package_holds_only_what_the_table_names():
    """hnm_ray/ holds the entry points and the stage folders, each a row of the table: a new top-level module fails."""
    named = set(re.findall(r"`hnm_ray/([^`/]+)/?`", _section("Architecture")))
    top = {p.name for p in (REPO / "hnm_ray").iterdir() if p.name not in ("__init__.py", "__pycache__")}
    assert sorted(top - named) == []


def test_every_train_flag_the_readme_names_parses():
    text = _section("Configuration: one tree of knobs")
    new = re.findall(r"→ `(--[a-z_.-]+)`", text) + re.findall(r"`(--[a-z][a-z_-]+)`", text.split("Unchanged short forms")[1])
    flags = [f for f in new if not f.startswith("--sweep")]
    assert len(flags) >= 30, flags
    known = build_parser()._option_string_actions
    assert [f for f in flags if f not in known] == []


@pytest.mark.parametrize("module", ["hnm_ray.train", "hnm_ray.tune", "hnm_ray.extract", "hnm_ray.training.mil",
                                    "hnm_ray.predict", "hnm_ray.demo", "hnm_ray.import_features"])
def test_every_cli_prints_its_help(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out
