"""A shared run folder, config or checkpoint runs no code and writes nowhere else (issue 28).

Each payload only writes a marker file under the test's tmp dir; the tests check the marker stays absent (or
unchanged) and that the refusal is one clear error saying how to allow it.
"""
from __future__ import annotations

import ast
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import yaml

from hnm_ray import config as cfg
from hnm_ray.core import storage
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError, ModelFileError

PAYLOAD = """
from pathlib import Path

from hnm_ray.models.dsmil import DSMIL
from hnm_ray.models.cnn import SmallCNN


def build(*args, **kwargs):
    Path({marker!r}).write_text("code ran")
    return DSMIL(*args, **kwargs) if args else SmallCNN()
"""


@pytest.fixture
def labplug(tmp_path, monkeypatch) -> tuple[str, Path]:
    """An importable plug-in module `labplug` whose `build` writes a marker (as a shared working directory would)."""
    marker = tmp_path / "marker"
    (tmp_path / "labplug.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "labplug", raising=False)
    return "labplug:build", marker


def _shared_run(folder: Path, **sections) -> Path:
    """A run folder as someone else shares it: config.yaml with `sections` on top of the defaults."""
    folder.mkdir(parents=True)
    cfg.save_yaml(cfg.merge(cfg.to_tree(TrainConfig()), sections), folder / "config.yaml")
    return folder


def test_a_plugin_named_by_a_config_file_needs_the_command_line_or_trust(tmp_path, labplug):
    from hnm_ray.train import build_parser

    spec, marker = labplug
    config = tmp_path / "shared.yaml"
    config.write_text(yaml.safe_dump({"encoder": {"name": spec}}))
    with pytest.raises(ConfigError, match=r"encoder\.name.*labplug:build.*--config .*shared\.yaml.*--trust-plugins"):
        cfg.load_config(TrainConfig, build_parser().parse_args(["--config", str(config)]))
    named = cfg.load_config(TrainConfig, build_parser().parse_args(["--config", str(config), "--encoder.name", spec]))
    trusted = cfg.load_config(TrainConfig, build_parser().parse_args(["--config", str(config), "--trust-plugins"]))
    assert named.encoder.name == trusted.encoder.name == spec
    shipped = cfg.load_config(TrainConfig, build_parser().parse_args(["--recipe", "paper"]))  # package files are ours
    assert shipped.mil.aggregator == "dsmil_its2clr"
    assert not marker.exists()


def test_resume_refuses_a_torchscript_encoder_named_by_the_run_folder(tmp_path, monkeypatch):
    from hnm_ray.train import parse_args

    marker = tmp_path / "marker"
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: marker.write_text("code ran"))
    script = tmp_path / "share" / "encoder.pt"
    run = _shared_run(tmp_path / "share" / "run", encoder={"name": str(script)}, run={"runs_dir": str(tmp_path)})
    script.write_bytes(b"PK")
    with pytest.raises(ConfigError, match=r"encoder\.name.*resumed run's config\.yaml.*--trust-plugins"):
        parse_args(["--resume", str(run)])
    config, _ = parse_args(["--resume", str(run), "--trust-plugins"])
    assert config.encoder.name == str(script) and not marker.exists()


def test_predict_refuses_a_checkpoint_naming_a_plugin_encoder(tmp_path, labplug, ray_session, demo_cohort):
    from hnm_ray.predict import predict

    spec, marker = labplug
    checkpoint = _shared_run(tmp_path / "share" / "checkpoint", encoder={"name": spec})
    (checkpoint / "meta.json").write_text(json.dumps({"encoder_weights": None, "threshold": 0.5, "seed": 0}))
    with pytest.raises(ConfigError, match=r"encoder\.name.*labplug:build.*checkpoint/config\.yaml.*--trust-plugins"):
        predict(checkpoint, demo_cohort, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_aggregator_json_naming_a_plugin_runs_it_only_when_the_config_names_it(tmp_path, labplug):
    from hnm_ray.models.inference import load_aggregator, save_aggregator
    from hnm_ray.models.aggregators import build_standardized

    spec, marker = labplug
    meta = {"aggregator": spec, "dim": 8, "hidden": 4, "dropout": 0.0}
    save_aggregator(tmp_path / "share" / "aggregator", build_standardized("dsmil", 8, hidden=4).state_dict(), meta)
    with pytest.raises(ModelFileError, match=r"aggregator\.json names the aggregator plug-in 'labplug:build'.*"
                                             r"--trust-plugins"):
        load_aggregator(tmp_path / "share" / "aggregator", plugin="dsmil")
    assert not marker.exists()
    model, _ = load_aggregator(tmp_path / "share" / "aggregator", plugin=spec)  # named on the command line
    assert marker.exists() and not model.training


def test_registered_names_are_never_looked_up_as_files(tmp_path, monkeypatch):
    from hnm_ray.models.encoders import build_encoder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "encoder").write_bytes(b"not a registered name, not to be loaded")
    with pytest.raises(ConfigError, match="unknown encoder 'encoder'"):
        build_encoder("encoder")


def test_torch_is_at_least_2_6_and_every_torch_load_passes_weights_only():
    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("torch>=2.6") for d in deps), deps
    loads = []
    for path in [*(root / "hnm_ray").rglob("*.py"), *(root / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                weights_only = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                loads.append((f"{path.name}:{node.lineno}", weights_only))
    assert loads and all(w == "True" for _, w in loads), loads


def test_writes_replace_symlinks_instead_of_following_them(tmp_path):
    from hnm_ray.run.run_folder import RunState

    outside = tmp_path / "victim"
    outside.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "state.tmp", "metrics.json"):  # state.tmp: RunState's temp name before the fix
        (run / name).symlink_to(outside)
    cfg.save_yaml(TrainConfig(), run / "config.yaml")
    RunState(run).done("stage", 1)
    storage.write_bytes("{}", run / "metrics.json")
    (run / "errors.jsonl").symlink_to(outside)
    with pytest.raises(OSError):  # an append cannot replace the file: it refuses the link (FeatureStore: StoreError)
        storage.append_record(run / "errors.jsonl", "{}")
    assert outside.read_text() == "precious"
    assert not any((run / n).is_symlink() for n in ("config.yaml", "metrics.json"))
    assert json.loads((run / "state.json").read_text()) == {"stage": 1}


def test_a_run_folder_with_a_link_out_of_it_is_refused(tmp_path):
    from hnm_ray.train import parse_args

    run = _shared_run(tmp_path / "share" / "run", run={"runs_dir": str(tmp_path)})
    (tmp_path / "home").mkdir()
    (run / "checkpoint").symlink_to(tmp_path / "home")
    with pytest.raises(ConfigError, match=r"resume.*checkpoint is a symlink to .*home, outside"):
        parse_args(["--resume", str(run)])


@pytest.mark.parametrize("name", ["/home/someone/important", "../../../x", "a/b", "..", "a\\b"])
def test_run_name_is_one_folder_name(name):
    with pytest.raises(ConfigError, match=r"run\.name.*single folder name"):
        cfg.from_tree(TrainConfig, {"run": {"name": name}})


def test_yaml_anchors_and_aliases_are_refused_before_expansion(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                      for p, c in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*line 1 uses a YAML anchor or alias"):
        cfg.load_yaml(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("run: &r {seed: 1, again: *r}\n")
    with pytest.raises(ConfigError, match="anchor or alias"):
        cfg.load_yaml(loop)


def test_passwords_in_uris_are_masked_in_config_files_and_logs(tmp_path, caplog):
    import logging

    from hnm_ray.run.progress import MaskingFormatter
    from hnm_ray.run.tracking import flat_params

    config = cfg.from_tree(TrainConfig, {"run": {"tracking_uri": "https://alice:S3cretPw@mlflow.lab:5000"}})
    cfg.save_yaml(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "S3cretPw" not in text and "https://alice:***@mlflow.lab:5000" in text
    assert flat_params(config)["run.tracking_uri"] == "https://alice:***@mlflow.lab:5000"
    record = logging.LogRecord("hnm_ray", logging.INFO, __file__, 1, "MLflow at %s", (config.run.tracking_uri,), None)
    assert "S3cretPw" not in MaskingFormatter("%(message)s").format(record)


def _bomb(path: Path, side: int = 12000, tile: int = 512) -> Path:
    """A 0.5 MB tiled TIFF declaring side x side RGB px in one level: every tile the same tiny deflate block (432 MB
    decoded as one level: what a thumbnail of it cost before the pixel budget)."""
    import zlib

    import numpy as np
    import tifffile

    block = zlib.compress(np.full((tile, tile, 3), 200, np.uint8).tobytes(), 9)
    with tifffile.TiffWriter(path) as tif:
        tif.write((block for _ in range((-(-side // tile)) ** 2)), shape=(side, side, 3), dtype=np.uint8,
                  tile=(tile, tile), compression="zlib", photometric="rgb")
    return path


def test_a_decompression_bomb_slide_is_refused_by_the_pixel_budget_and_the_others_go_on(tmp_path, demo_cohort):
    from hnm_ray.config import TilingConfig
    from hnm_ray.extraction.index import INDEX_FAILED, TileIndex
    from hnm_ray.extraction.index_stream import index_rows
    from hnm_ray.store.manifest import SlideRecord, load_manifest

    good = load_manifest(demo_cohort)[0]
    bomb = SlideRecord(slide_id="bomb", path=str(_bomb(tmp_path / "bomb.tif")), label=0, split="train")
    assert Path(bomb.path).stat().st_size < 1 << 20
    index = TileIndex(tmp_path, TilingConfig())
    refused = index_rows(bomb, index)  # the extraction stream's row: the driver records it in errors.jsonl
    assert refused["tile_id"].to_pylist() == [INDEX_FAILED] and not index.has("bomb")
    cause = refused["error"][0].as_py()
    assert "12000x12000 px, more than the 67108864 px" in cause and "tiling.tissue.max_decoded_pixels" in cause
    assert index_rows(good, index).num_rows > 0 and index.has(good.slide_id)


CRASH = """
import os, signal, sys
from hnm_ray.extraction import index
from hnm_ray.config import TilingConfig
from hnm_ray.store.manifest import SlideRecord

index.tile_index = lambda record, tiling: os.kill(os.getpid(), signal.SIGKILL)  # a decoder that kills its process
print(index.index_or_error(SlideRecord(slide_id="s1", path=sys.argv[1], label=0, split="train"), TilingConfig()))
"""


def test_a_slide_that_kills_its_reader_process_is_an_error_for_that_slide_only(tmp_path):
    import subprocess

    slide = tmp_path / "s1.tif"
    slide.write_bytes(b"II*\x00")
    done = subprocess.run([sys.executable, "-c", CRASH, str(slide)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]  # before: the task's process itself was killed
    assert "('s1', None, \"slide 's1': the process reading it died (killed by SIGKILL)" in done.stdout


def test_the_report_links_only_files_with_safe_names_and_shows_no_password(tmp_path):
    from hnm_ray.report.html import write_run_report

    run = tmp_path / "run"
    config = cfg.from_tree(TrainConfig, {"run": {"tracking_uri": "https://alice:S3cretPw@mlflow.lab"}})
    cfg.save_yaml(config, run / "config.yaml")
    (run / "javascript:alert(1)").write_text("x")
    (run / "metrics_round0.json").write_text("{}")
    page = write_run_report(run).read_text()
    assert "href='./metrics_round0.json'" in page and "href='./config.yaml'" in page
    assert "javascript" not in page and "S3cretPw" not in page and "alice:***@mlflow.lab" in page


def test_the_miner_actor_name_is_unique_per_run_and_kept_for_resume(tmp_path):
    from hnm_ray.run.run_folder import RunState
    from hnm_ray.train import miner_name_of

    first, other = tmp_path / "a" / "run", tmp_path / "b" / "run"  # same folder name: sweep trials, two users
    name = miner_name_of(RunState(first))
    assert name == miner_name_of(RunState(first)) != miner_name_of(RunState(other))
    assert "run" not in name.removeprefix("hnm_miner-")


def test_a_sweep_refuses_a_password_in_a_uri_before_ray_writes_it_into_every_trial_folder(tmp_path):
    from hnm_ray.tune import TuneConfig, refuse_passwords

    config = cfg.from_tree(TuneConfig, {"run": {"tracking_uri": "https://alice:S3cretPw@mlflow.lab"},
                                        "sweep": {"storage_path": str(tmp_path)}})
    masked = r"run\.tracking_uri.*alice:\*\*\*@mlflow\.lab.*MLFLOW_TRACKING_PASSWORD"
    with pytest.raises(ConfigError, match=masked) as err:
        refuse_passwords(config)
    assert "S3cretPw" not in str(err.value)
    refuse_passwords(cfg.from_tree(TuneConfig, {"run": {"tracking_uri": "https://mlflow.lab"}}))


def test_a_timm_or_hub_name_in_a_code_knob_other_than_the_encoder_runs_nothing(tmp_path, monkeypatch):
    """`timm:` / `hf-hub:` names pass the trust check as model names (only encoder.name resolves them): a config
    file's `mil.aggregator: timm:<attr>` must not import and call through them as a plug-in."""
    import types

    from hnm_ray.models.aggregators import build_aggregator
    from hnm_ray.train import build_parser

    marker = tmp_path / "marker"
    fake = types.ModuleType("timm")
    fake.build = lambda *a, **k: marker.write_text("code ran")
    monkeypatch.setitem(sys.modules, "timm", fake)
    for spec in ("timm:build", "hf-hub:build"):
        config = tmp_path / "shared.yaml"
        config.write_text(yaml.safe_dump({"mil": {"aggregator": spec}}))
        loaded = cfg.load_config(TrainConfig, build_parser().parse_args(["--config", str(config)]))
        with pytest.raises(ConfigError, match=r"mil\.aggregator.*only --encoder\.name"):
            build_aggregator(loaded.mil.aggregator, 8)  # as check_inputs and the MIL loop build it
        assert not marker.exists()
