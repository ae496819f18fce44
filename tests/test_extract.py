"""Extraction pipeline: store round trip, embeddings == encoder(tile), resume after kill -9, corrupt slides, config.

The Ray tests share the session's local Ray (`ray_session`); the resume test also runs `python -m hnm_ray.extract`
in a subprocess with its own local Ray, kills its process group mid-run and checks that nothing of it lingers.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from _support import small_config, store_for

from hnm_ray import config as cfg
from hnm_ray.config import TilingConfig, TrainConfig
from hnm_ray.core.errors import ConfigError
from hnm_ray.extraction.decode import TileReaders, decode_batch
from hnm_ray.extract import SlideGatherer, extract_features, main
from hnm_ray.extraction.index import INDEX_FAILED, TileIndex
from hnm_ray.slides.synthetic import MASK_DOWNSAMPLE, damage_jpeg_tiles
from hnm_ray.store.features import FeatureStore, feature_schema
from hnm_ray.store.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
TILE = 224
DIM = 128  # small_cnn
TEMP_NAME = re.compile(r"^\..+\.parquet\.tmp$")


def _extract(manifest: Path | str, out: Path):
    """Extract a manifest with the small test config into a store under `out`: (summary, store)."""
    config = small_config()
    store = store_for(out, config)
    return extract_features(load_manifest(manifest, require_labels=False), store, config), store


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def records(demo_cohort):
    return load_manifest(demo_cohort, require_labels=False)


@pytest.fixture(scope="module")
def clean(ray_session, demo_cohort, tmp_path_factory):
    """One clean small_cnn/float32 extraction of the 8-slide demo cohort: (summary, store)."""
    return _extract(demo_cohort, tmp_path_factory.mktemp("clean_store"))


# ---------------------------------------------------------------------------------------------- config (no Ray)

@pytest.mark.parametrize("key, value", [("tiling.tile_size", 8), ("tiling.tile_size", 5000),
                                        ("extract.dtype", "float64"), ("extract.dtype", "bfloat16"),
                                        ("extract.batch_size", 0), ("tiling.min_tissue", 1.5), ("tiling.level", -1),
                                        ("extract.cpus_per_decoder", 0)])
def test_config_errors_name_the_key(key, value):
    section, knob = key.split(".")
    with pytest.raises(ConfigError) as info:
        cfg.from_tree(TrainConfig, {section: {knob: value}})
    assert info.value.key == key
    assert repr(value) in str(info.value) and key in str(info.value)


def test_config_errors_from_yaml_and_cli(tmp_path):
    path = tmp_path / "extract.yaml"
    path.write_text("tiling:\n  tile_size: 12\nencoder:\n  name: small_cnn\n")
    with pytest.raises(ConfigError) as info:
        cfg.from_tree(TrainConfig, cfg.load_yaml(path))
    assert info.value.key == "tiling.tile_size"
    with pytest.raises(ConfigError) as info:
        cfg.from_tree(TrainConfig, {"tiling": {"level": None, "mpp": None}})
    assert info.value.key == "tiling.level"
    with pytest.raises(ConfigError) as info:
        cfg.from_tree(TrainConfig, {"tiling": {"tile_sz": 224}})
    assert info.value.key == "tiling.tile_sz"
    # The CLI reports config errors (and a missing manifest) with exit code 2 before starting Ray.
    assert main(["--manifest", "m.csv", "--tile-size", "4097"]) == 2
    assert main(["--config", str(path)]) == 2
    assert main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", "m.csv", "--dtype", "float64"])  # argparse choices
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------- decode + gather units (no Ray)

def test_decode_batch_marks_rows_of_an_unreadable_slide(demo_cohort, records, tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a tiff" * 50)
    good = records[0]
    batch = {"slide_id": np.array([good.slide_id] * 2 + ["bad"] * 2 + [good.slide_id], object),
             "path": np.array([good.path] * 2 + [str(bad)] * 2 + [good.path], object),
             "tile_id": np.arange(5, dtype=np.int32), "x": np.array([0, 224, 0, 0, 448], np.int32),
             "y": np.zeros(5, np.int32), "level": np.zeros(5, np.int8), "size": np.full(5, TILE, np.int16)}
    tiles, errors = decode_batch(TileReaders(), batch, TILE, num_workers=1)
    assert tiles.shape == (5, TILE, TILE, 3) and tiles.dtype == np.uint8
    assert [bool(e) for e in errors] == [False, False, True, True, False]
    assert "'bad'" in errors[2] and "not a TIFF" in errors[2]
    assert not tiles[2:4].any()  # failed rows are zeros, never another slide's pixels
    from hnm_ray.slides.reader import open_slide

    with open_slide(good.path, device="cpu") as reader:
        direct = reader.read_tiles(np.array([[0, 0], [224, 0], [448, 0]]), TILE)
    np.testing.assert_array_equal(tiles[[0, 1, 4]], direct)


def test_encoder_actor_decoding_two_batches_at_once_gives_the_sequential_embeddings(records):
    """On CPUs the pipeline runs two calls of one encoder actor at once (decode one batch while encoding the other):
    their stage locks must give exactly what one call after the other gives."""
    from concurrent.futures import ThreadPoolExecutor

    from hnm_ray.extract import TileEncoder

    config = small_config()
    batches = []
    for record in records[:4]:
        x = np.arange(6, dtype=np.int32) * TILE
        batches.append({"slide_id": np.array([record.slide_id] * 6, object), "path": np.array([record.path] * 6, object),
                        "tile_id": np.arange(6, dtype=np.int32), "x": x, "y": np.zeros(6, np.int32),
                        "level": np.zeros(6, np.int8), "size": np.full(6, TILE, np.int16),
                        "n_tiles": np.full(6, 6, np.int64), "error": np.full(6, "", object)})
    sequential = TileEncoder(config.encoder, 0, False, 1, TILE, 1)
    want = [sequential(b)["embedding"] for b in batches]
    concurrent = TileEncoder(config.encoder, 0, False, 1, TILE, 1)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(concurrent, batches * 3))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out["embedding"], want[i % 4])
        assert out["slide_id"][0] == batches[i % 4]["slide_id"][0] and not any(out["error"])


def test_gatherer_writes_complete_slides_in_tile_order_and_fails_slides_with_errors(tmp_path):
    def index(slide_id, n):
        ids = np.arange(n, dtype=np.int32)
        return pa.table({"slide_id": [slide_id] * n, "path": ["p"] * n, "tile_id": ids, "x": ids * TILE,
                         "y": np.zeros(n, np.int32), "level": np.zeros(n, np.int8), "size": np.full(n, TILE, np.int16),
                         "tissue_fraction": np.ones(n, np.float32), "truth": np.full(n, -1, np.int8)})

    sizes = {"a": 5, "b": 3, "c": 2, "d": 0}

    def batch(slide_ids, tile_ids, errors=None):
        tile_ids = np.asarray(tile_ids, np.int32)
        emb = np.stack([tile_ids.astype(np.float32)] * 4, axis=1)  # embedding == tile id: order is checkable
        return {"slide_id": np.asarray(slide_ids, object), "tile_id": tile_ids, "embedding": emb,
                "n_tiles": np.asarray([sizes[s] for s in slide_ids], np.int64),
                "error": np.asarray(errors or [""] * len(tile_ids), object)}

    store = FeatureStore(tmp_path, "t")
    tile_index = TileIndex(tmp_path, TilingConfig(tile_size=TILE))
    for slide_id in "abc":
        tile_index.write(slide_id, index(slide_id, sizes[slide_id]))
    gatherer = SlideGatherer(store, tile_index, "float32", {"x": 1})
    assert gatherer.add(batch(["a", "a", "b", "a"], [3, 4, 0, 0])) == (0, 4)  # a's rows split around b's
    assert gatherer.add(batch(["b", "b", "c"], [2, 1, 0], ["", "", "slide 'c': tile read failed: boom"])) == (1, 3)
    assert gatherer.add(batch(["a", "a", "c", "d"], [2, 1, 1, INDEX_FAILED], ["", "", "", "slide 'd': no tissue"])) == (1, 4)
    assert store.completed() == {"a", "b"} and gatherer.failed.keys() == {"c", "d"} and gatherer.unfinished() == []
    bag = store.read_bag("a")
    np.testing.assert_array_equal(bag.tile_ids, np.arange(5))
    np.testing.assert_array_equal(bag.features[:, 0], np.arange(5))
    np.testing.assert_array_equal(bag.coords[:, 0], np.arange(5) * TILE)
    assert [(e["slide_id"], e["stage"]) for e in store.errors()] == [("c", "extract"), ("d", "index")]
    assert "boom" in store.errors()[0]["cause"]


# ----------------------------------------------------------------------------------------------- Ray pipeline

@pytest.mark.timeout(300)
def test_store_round_trip_schema_metadata_and_truth(clean, records, demo_cohort):
    summary, store = clean
    assert summary.slides_failed == [] and summary.slides_written == len(records) == summary.slides_total
    assert store.completed() == {r.slide_id for r in records}
    assert store.errors() == []
    expected = feature_schema(DIM, "float32")
    total = 0
    positives_with_tumour = 0
    for record in records:
        path = store.slide_path(record.slide_id)
        assert path.is_file()
        schema = pq.read_schema(path)
        assert schema.equals(expected), schema
        assert [f.type for f in schema] == [pa.string(), pa.int32(), pa.int32(), pa.int32(), pa.int8(), pa.int16(),
                                            pa.list_(pa.float32(), DIM), pa.int8()]
        meta = json.loads(schema.metadata[b"hnm_ray"])
        assert meta["encoder"] == "small_cnn" and meta["encoder_tag"] == store.encoder_tag == "small_cnn"
        assert (meta["tile_size"], meta["dim"], meta["dtype"], meta["level"], meta["round"]) == (TILE, DIM, "float32", 0, 0)
        table = pq.read_table(path)
        n = table.num_rows
        total += n
        assert n > 0 and set(table.column("slide_id").to_pylist()) == {record.slide_id}
        np.testing.assert_array_equal(table.column("tile_id").to_numpy(), np.arange(n))
        x, y = table.column("x").to_numpy(), table.column("y").to_numpy()
        assert (x % TILE == 0).all() and (y % TILE == 0).all()
        assert np.all(np.diff(y * 100_000 + x) > 0)  # row-major tile ids: sorted by (y, x), no duplicates
        assert set(table.column("level").to_pylist()) == {0} and set(table.column("size").to_pylist()) == {TILE}
        bag = store.read_bag(record.slide_id)
        assert np.isfinite(bag.features).all() and bag.features.std() > 0
        truth = table.column("truth").to_numpy()
        if record.annotation:  # positive slides carry masks: truth must match the mask, tile by tile
            assert record.label == 1 and set(np.unique(truth)) <= {0, 1}
            mask = np.asarray(Image.open(record.annotation).convert("L")) > 0
            scale = MASK_DOWNSAMPLE  # demo masks are at level 0 / 4, tiles are multiples of 4 px
            frac = np.array([mask[yy // scale: (yy + TILE) // scale, xx // scale: (xx + TILE) // scale].mean()
                             for xx, yy in zip(x, y)])
            clear = np.abs(frac - 0.5) > 1e-6
            np.testing.assert_array_equal(truth[clear], (frac[clear] >= 0.5).astype(np.int8)[clear])
            positives_with_tumour += int(truth.max() == 1)
        else:
            assert (truth == -1).all()  # no mask: unknown, never 0 or 1
    assert positives_with_tumour >= 1  # the truth column is not all zeros
    assert summary.tiles_written == total
    assert store.metadata()["dim"] == DIM


@pytest.mark.timeout(300)
def test_embeddings_equal_the_encoder_applied_to_directly_read_tiles(clean, records):
    import torch

    from hnm_ray.models.encoders import build_encoder, to_model_input
    from hnm_ray.slides.reader import open_slide

    _, store = clean
    torch.manual_seed(0)  # run.seed
    model = build_encoder("small_cnn").eval()
    rng = np.random.default_rng(7)
    for record in [records[i] for i in rng.choice(len(records), 4, replace=False)]:
        bag = store.read_bag(record.slide_id)
        rows = rng.choice(len(bag), min(5, len(bag)), replace=False)
        with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:
            tiles = reader.read_tiles(bag.coords[rows], TILE, level=0)
        with torch.inference_mode():
            direct = model(to_model_input(tiles)).numpy()
        np.testing.assert_allclose(bag.features[rows], direct, atol=1e-4, rtol=0)
        # Discriminative: the stored row of another tile does not match this tile's embedding.
        shifted = bag.features[(rows + 1) % len(bag)]
        assert not np.allclose(shifted, direct, atol=1e-4)


def _complete_files(store: FeatureStore) -> dict[str, Path]:
    """Every non-temp entry of the store folder must be a complete slide file (or errors.jsonl)."""
    files = {}
    for path in store.directory.iterdir():
        if path.name.endswith(".parquet") and not path.name.startswith("."):
            files[path.name[: -len(".parquet")]] = path
        else:
            assert path.name == "errors.jsonl" or TEMP_NAME.match(path.name), f"unexpected file {path.name}"
    return files


def _name(process) -> str:
    """A process's name, or '' once it is gone."""
    try:
        return process.name()
    except Exception:  # noqa: BLE001 - psutil.NoSuchProcess and friends
        return ""


def _wait_gone(processes, timeout: float) -> list:
    """Processes of `processes` still alive (zombies count as gone) after waiting up to `timeout` s."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in processes:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# Ray's own messages when a local Ray does not come up in time, seen on an overloaded machine: the GCS port file's
# wait (RAY_gcs_server_port_wait_time_s) and the raylet's registration (a fixed 30 s in ray/_private/node.py).
RAY_STARTUP_TIMEOUTS = ("Timed out waiting for file", "timed out during startup")


def _run_until_a_slide_is_written(cmd: list[str], env: dict[str, str], store: FeatureStore, log_path: Path,
                                  tries: int = 3):
    """Start `cmd` in its own process group and return (process, its process tree) once `store` holds a slide
    file. A start whose local Ray timed out coming up (only that) is killed and started again, up to `tries`
    times; any other end before a slide was written fails the test with the log's tail."""
    import psutil

    env = {**env, "RAY_gcs_server_port_wait_time_s": "120"}  # 30 s by default: too short on a loaded machine
    for attempt in itertools.count(1):
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 240
        while not store.files():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        else:
            return proc, psutil.Process(proc.pid).children(recursive=True)  # gcs, raylet, agents, Ray workers
        _kill_group(proc)
        printed = log_path.read_text()
        if attempt == tries or not any(message in printed for message in RAY_STARTUP_TIMEOUTS):
            pytest.fail(f"extraction ended ({proc.returncode}) before a slide was written (try {attempt}):\n"
                        f"{printed[-3000:]}")
        print(f"try {attempt}: the extraction's local Ray timed out starting; starting it again")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (what is left of it) and reap `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


@pytest.mark.timeout(600)  # up to 3 starts of the killed run's Ray on a loaded machine
def test_resume_after_the_process_is_killed(clean, records, tmp_path):
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path

    _, reference = clean
    # All eight of the cohort's slides: with four, the kill landed after all of them on a quiet machine (the slides
    # are small: the other three were written while the process tree was listed); the rerun extracts only the rest.
    manifest = _write_manifest(tmp_path / "manifest.csv", [dataclasses.asdict(r) for r in records])
    expected = {r.slide_id: reference.read_bag(r.slide_id) for r in records}
    root = tmp_path / "store"
    store = FeatureStore(root, "small_cnn", round=0)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the test session's
    # batch_size 4: at most one slide completes per encoder batch, so the kill lands between slides.
    cmd = [sys.executable, "-m", "hnm_ray.extract", "--manifest", str(manifest), "--out", str(root),
           "--encoder.name", "small_cnn", "--dtype", "float32", "--extract.batch_size", "4"]
    proc, tree = _run_until_a_slide_is_written(cmd, env, store, tmp_path / "killed_run.log")
    names = {_name(p) for p in tree}
    _kill_group(proc)
    # Ray workers run in their own process groups; they must exit once their raylet is gone.
    leftover = _wait_gone(tree, 30)
    for p in leftover:  # do not leak them even when the assertion fails
        p.kill()
    assert not leftover, [(p.pid, _name(p)) for p in leftover]
    assert "raylet" in names and "gcs_server" in names, names

    first = _complete_files(store)
    assert 1 <= len(first) < len(records), f"kill landed after {len(first)} of {len(records)} slides"
    stats = {}
    for slide_id, path in first.items():
        table = pq.read_table(path)  # complete and readable
        assert table.num_rows == len(expected[slide_id])
        np.testing.assert_array_equal(table.column("tile_id").to_numpy(), expected[slide_id].tile_ids)
        st = path.stat()
        stats[slide_id] = (st.st_ino, st.st_mtime_ns)

    # A writer killed mid-write leaves only a hidden temp file: plant one for a missing slide; it must not count.
    missing = sorted(expected.keys() - first.keys())[0]
    stale = store.directory / f".{missing}.0123456789ab.parquet.tmp"
    stale.write_bytes(next(iter(first.values())).read_bytes()[:500])
    assert missing not in store.completed()

    summary, _ = _extract(manifest, root)  # rerun in this process (the session's Ray)
    assert summary.slides_failed == []
    assert summary.slides_skipped_done == len(first)
    assert summary.slides_written == len(records) - len(first)
    assert summary.tiles_written == sum(len(expected[s]) for s in expected if s not in first)
    files = _complete_files(store)
    assert files.keys() == expected.keys() and store.completed() == expected.keys()
    assert pq.read_table(files[missing]).num_rows == len(expected[missing])
    for slide_id in first:  # finished slides were not rewritten
        st = files[slide_id].stat()
        assert (st.st_ino, st.st_mtime_ns) == stats[slide_id]
    merged = pa.concat_tables(store.read_table(s).select(["slide_id", "tile_id"]) for s in sorted(files))
    keys = set(zip(merged.column("slide_id").to_pylist(), merged.column("tile_id").to_pylist()))
    assert len(keys) == merged.num_rows == sum(len(b) for b in expected.values())  # no duplicates, none lost
    for slide_id, bag in expected.items():
        got = store.read_bag(slide_id)
        np.testing.assert_array_equal(got.tile_ids, bag.tile_ids)
        np.testing.assert_array_equal(got.coords, bag.coords)
        np.testing.assert_allclose(got.features, bag.features, atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_corrupt_slides_are_skipped_and_recorded(clean, records, tmp_path, capsys):
    _, reference = clean
    good = records[:2]
    source = records[2]
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "not_tiff.svs").write_bytes(b"<html>404 Not Found</html>\n" * 200)
    data = Path(source.path).read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 2])
    coords = reference.read_bag(source.slide_id).coords[:6]
    assert len(damage_jpeg_tiles(Path(source.path), folder / "bad_jpeg.svs", coords, 224)) >= 3
    bad = ["not_tiff", "truncated", "bad_jpeg"]
    rows = [{"slide_id": r.slide_id, "path": r.path, "label": r.label} for r in good]
    rows += [{"slide_id": s, "path": f"slides/{s}.svs", "label": 0} for s in bad]
    manifest = _write_manifest(tmp_path / "manifest.csv", rows)
    out = tmp_path / "store"

    code = main(["--manifest", str(manifest), "--out", str(out), "--encoder.name", "small_cnn", "--dtype", "float32"])
    printed = capsys.readouterr().out
    store = FeatureStore(out, "small_cnn")
    assert code == 0  # the run completes: some slides were written
    assert {r.slide_id for r in good} <= store.completed()
    errors = {e["slide_id"]: e for e in store.errors()}
    assert "not a TIFF file" in errors["not_tiff"]["cause"] and "'not_tiff'" in errors["not_tiff"]["cause"]
    assert "truncated or corrupt TIFF" in errors["truncated"]["cause"]
    failed = re.search(r"slides_failed=\[([^\]]*)\]", printed).group(1)
    for slide_id in ("not_tiff", "truncated"):
        assert f"'{slide_id}'" in failed and slide_id not in store.completed()
    # cuCIM (26.10, CPU) decodes a JPEG tile with noise in its entropy-coded data WITHOUT raising (libjpeg prints
    # "Unsupported marker type" and returns gray/garbage pixels); the decode stage's JPEG marker check must catch it.
    assert "'bad_jpeg'" in failed and "bad_jpeg" not in store.completed()
    assert errors["bad_jpeg"]["stage"] == "extract" and "jpeg" in errors["bad_jpeg"]["cause"].lower()
    assert not list(store.directory.glob(".bad_jpeg*"))  # nothing half-written left behind

    # A manifest of only unusable slides: nothing written -> exit code 1 and the failures listed.
    only_bad = _write_manifest(tmp_path / "bad.csv", [r for r in rows if r["slide_id"] in ("not_tiff", "truncated")])
    assert main(["--manifest", str(only_bad), "--out", str(tmp_path / "store2"), "--encoder.name", "small_cnn"]) == 1
    printed = capsys.readouterr().out
    assert "slides_failed=['not_tiff', 'truncated']" in printed and "slides_written=0" in printed
