"""Bad inputs: each ends in one clear error of ours (an HnmError naming the slide/row/key and the cause), and
nothing else is lost: inside an otherwise good manifest the bad slides are recorded in errors.jsonl and the
good ones are extracted completely.

Covered: missing slide file, non-TIFF bytes named .svs, truncated TIFF, a corrupt JPEG tile inside a valid TIFF
(cuCIM decodes it into gray pixels without raising: the extraction's JPEG marker check catches it), an all-white
slide, bad manifest rows/columns, unknown or out-of-range config keys, and an output folder that cannot be written.
"""
from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from _support import small_config, store_for

from hnm_ray import config as cfg
from hnm_ray.config import TrainConfig
from hnm_ray.core.errors import ConfigError, HnmError, ManifestError, NoTissueError, SlideError, StoreError
from hnm_ray.extraction.decode import TileReaders, decode_batch
from hnm_ray.extract import extract_features
from hnm_ray.extraction.index import tile_index
from hnm_ray.slides.integrity import jpeg_tile_problem
from hnm_ray.slides.reader import open_slide
from hnm_ray.slides.synthetic import damage_jpeg_tiles, write_pyramid
from hnm_ray.store.manifest import SlideRecord, load_manifest
from hnm_ray.train import main as train_main

BAD = ("missing", "not_tiff", "truncated", "bad_jpeg", "white")


def _extract(out: Path, records):
    """Extract `records` with the small test config into a store under `out`."""
    config = small_config()
    return extract_features(records, store_for(out, config), config)


def _jpeg_tiles(path: Path, level_page: int = 0) -> list[tuple[int, int]]:
    """(offset, byte count) of every JPEG tile of a page."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level_page]
        return list(zip((int(o) for o in page.dataoffsets), (int(c) for c in page.databytecounts)))


@pytest.fixture(scope="module")
def good(demo_cohort) -> list[SlideRecord]:
    return load_manifest(demo_cohort)


@pytest.fixture(scope="module")
def bad_slides(good, tmp_path_factory) -> dict[str, SlideRecord]:
    """One slide of each kind of damage, as records (label 0, split train)."""
    folder = tmp_path_factory.mktemp("bad_slides")
    source = Path(good[2].path)
    (folder / "not_tiff.svs").write_bytes(b"<html><body>404 Not Found</body></html>\n" * 100)
    data = source.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 2])
    grid = tile_index(good[2], small_config().tiling)
    coords = np.stack([grid["x"].to_numpy(), grid["y"].to_numpy()], axis=1)[:3]
    assert damage_jpeg_tiles(source, folder / "bad_jpeg.svs", coords, 224)
    rng = np.random.default_rng(0)
    write_pyramid(folder / "white.svs", rng.normal(242, 2.0, (1024, 1024, 3)).clip(0, 255).astype(np.uint8))
    paths = {name: folder / f"{name}.svs" for name in BAD}
    return {name: SlideRecord(name, str(path), 0, "train", None) for name, path in paths.items()}


# ----------------------------------------------------------------------------------------- slides, one by one

def test_missing_slide_file(bad_slides):
    with pytest.raises(SlideError) as info:
        open_slide(bad_slides["missing"].path, slide_id="missing")
    assert info.value.slide == "missing" and "file not found" in info.value.cause
    assert bad_slides["missing"].path in str(info.value)


def test_non_tiff_bytes_named_svs(bad_slides):
    with pytest.raises(SlideError) as info:
        open_slide(bad_slides["not_tiff"].path, slide_id="not_tiff")
    assert info.value.slide == "not_tiff"
    assert "is not a TIFF file" in info.value.cause and "<htm" in info.value.cause  # what the bytes are


def test_truncated_tiff(bad_slides):
    with pytest.raises(SlideError) as info:
        open_slide(bad_slides["truncated"].path, slide_id="truncated")
    assert info.value.slide == "truncated" and "truncated or corrupt TIFF" in info.value.cause


def test_white_slide_has_no_tissue(bad_slides):
    with pytest.raises(NoTissueError) as info:
        tile_index(bad_slides["white"], small_config().tiling)
    assert info.value.slide == "white"


def test_jpeg_marker_check_accepts_sound_tiles_and_names_the_damage(good, bad_slides):
    sound = Path(good[2].path).read_bytes()
    assert all(jpeg_tile_problem(sound[o:o + c]) is None for o, c in _jpeg_tiles(Path(good[2].path)))
    damaged = Path(bad_slides["bad_jpeg"].path).read_bytes()
    spans = _jpeg_tiles(Path(bad_slides["bad_jpeg"].path))
    problems = [jpeg_tile_problem(damaged[o:o + c]) for o, c in spans]
    overwritten = [sound[o:o + c] != damaged[o:o + c] for o, c in spans]
    assert any(overwritten)
    assert [p is not None for p in problems] == overwritten  # every damaged tile found, no sound one flagged
    # noise gives a marker that cannot be there, or one that may separate scans but then has a broken header
    assert all(re.match(r"invalid marker FF[0-9A-F]{2} inside|its JPEG segment headers are broken|JPEG segment FF", p)
               for p in problems if p), problems
    offset, count = _jpeg_tiles(Path(good[2].path))[0]
    tile = sound[offset:offset + count]
    assert "end-of-image" in jpeg_tile_problem(tile[: count // 2])  # cut short
    assert "start-of-image" in jpeg_tile_problem(b"\x00" * 64 + tile)


def test_corrupt_jpeg_tile_fails_its_slide_in_the_decode_stage(good, bad_slides):
    """cuCIM returns pixels for the damaged tile (no exception); decode_batch still marks the slide's rows."""
    record = bad_slides["bad_jpeg"]
    with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:  # the file itself is sound
        assert reader.info.backend == "cucim"
    grid = tile_index(good[2], small_config().tiling)
    n = 4
    batch = {"slide_id": np.array([good[2].slide_id] * n + [record.slide_id] * n, object),
             "path": np.array([good[2].path] * n + [record.path] * n, object),
             "tile_id": np.r_[np.arange(n), np.arange(n)].astype(np.int32),
             "x": np.tile(grid["x"].to_numpy()[:n], 2), "y": np.tile(grid["y"].to_numpy()[:n], 2),
             "level": np.zeros(2 * n, np.int8), "size": np.full(2 * n, 224, np.int16)}
    tiles, errors = decode_batch(TileReaders(), batch, 224, num_workers=1)
    assert not any(errors[:n])  # the same tiles of the sound slide decode fine
    assert all(errors[n:])
    assert "'bad_jpeg'" in errors[n] and "corrupt JPEG tile" in errors[n] and "level 0" in errors[n]
    assert record.path in errors[n]


# ----------------------------------------------------------------------------------------- manifest and config

def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_manifest_lists_every_bad_row(good, tmp_path):
    a, b, c = (r.path for r in good[:3])
    manifest = _write_csv(tmp_path / "m.csv", ["slide_id", "path", "label"], [
        ["s1", a, "2"],            # label outside {0, 1}
        ["s2", b, "1"],
        ["s3", c, "yes"],          # not a label either
        ["s2", c, "0"],            # duplicate slide_id
        ["s5", a, "-1"],
    ])
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert any("row 1" in p and "'s1'" in p and "'2' is not 0 or 1" in p for p in problems)
    assert any("row 3" in p and "'yes' is not 0 or 1" in p for p in problems)
    assert any("row 5" in p and "'-1' is not 0 or 1" in p for p in problems)
    assert any("rows 2, 4" in p and "duplicate slide_id 's2'" in p for p in problems)
    assert str(manifest) in str(info.value)


@pytest.mark.parametrize("header, missing", [(["slide_id", "path"], "label"), (["slide_id", "label"], "path"),
                                             (["path", "label"], "slide_id")])
def test_manifest_missing_a_column(good, tmp_path, header, missing):
    values = {"slide_id": "s1", "path": good[0].path, "label": "1"}
    manifest = _write_csv(tmp_path / "m.csv", header, [[values[h] for h in header]])
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    assert any(f"missing column {missing!r}" in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("values, key", [
    ({"mining": {"neg_ration": 0.2}}, "mining.neg_ration"),   # unknown key (typo)
    ({"mining": {"neg_ratio": 0.0}}, "mining.neg_ratio"),     # neg_ratio must be in (0, 1]
    ({"mining": {"neg_ratio": 1.5}}, "mining.neg_ratio"),
    ({"mining": {"neg_ratio": -0.2}}, "mining.neg_ratio"),
    ({"mil": {"margin": -1.0}}, "mil.margin"),                # negative ranking margin
    ({"mil": {"rank_k": 0}}, "mil.rank_k"),
    ({"mil": {"epochs": 0}}, "mil.epochs"),
])
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError) as info:
        cfg.from_tree(TrainConfig, values)
    assert info.value.key == key and key in str(info.value)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_config_error_from_yaml_and_flags_is_one_clear_line(tmp_path):
    """The CLI exits 2 with the ConfigError logged (hnm_ray's logger does not propagate: listen to it directly)."""
    (tmp_path / "c.yaml").write_text("mining:\n  neg_ratio: 0.2\n  negratio: 0.3\n")
    lines = _Lines()
    logger = logging.getLogger("hnm_ray")
    logger.addHandler(lines)
    try:
        assert train_main(["--config", str(tmp_path / "c.yaml")]) == 2
        assert train_main(["--neg-ratio", "1.5"]) == 2
    finally:
        logger.removeHandler(lines)
    assert len(lines.lines) == 2, lines.lines
    assert lines.lines[0].startswith("config key 'mining.negratio': unknown key")
    assert lines.lines[1].startswith("config key 'mining.neg_ratio'") and "1.5" in lines.lines[1]


# ----------------------------------------------------------------------------------------- unwritable output

@pytest.mark.timeout(120)
def test_output_under_a_regular_file_is_a_clear_store_error(ray_session, good, tmp_path):
    """Root ignores chmod, so the unwritable folder is one below a regular file (mkdir fails for everyone)."""
    blocker = tmp_path / "features"
    blocker.write_text("a file where the store folder should be\n")
    with pytest.raises(StoreError) as info:
        _extract(blocker / "store", good[:1])
    assert str(blocker / "store") in str(info.value) and "not writable" in str(info.value)
    assert blocker.read_text().startswith("a file")  # nothing clobbered


@pytest.fixture
def read_only_mount(tmpfs):
    """A read-only tmpfs (root ignores permission bits, not a read-only mount); skipped where mount is refused."""
    return tmpfs("ro", "ro,size=64k")


@pytest.mark.timeout(120)
def test_read_only_output_folder_is_a_clear_store_error(ray_session, good, read_only_mount):
    with pytest.raises(StoreError) as info:
        _extract(read_only_mount / "store", good[:1])
    assert "Read-only file system" in str(info.value) and str(read_only_mount / "store") in str(info.value)


# ----------------------------------------------------------------------------------------- the pipeline

@pytest.mark.timeout(600)
def test_bad_slides_in_a_good_manifest_are_recorded_and_the_good_ones_complete(ray_session, good, bad_slides,
                                                                                tmp_path):
    config = small_config()
    store = store_for(tmp_path / "store", config)
    ok = good[:2]
    records = ok[:1] + [bad_slides[name] for name in BAD] + ok[1:]
    summary = extract_features(records, store, config)

    assert summary.slides_failed == sorted(BAD)
    assert summary.slides_written == len(ok)
    assert store.completed() == {r.slide_id for r in ok}
    for record in ok:  # complete: every tile of its index, in order, readable
        expected = tile_index(record, config.tiling)
        table = pq.read_table(store.slide_path(record.slide_id))
        np.testing.assert_array_equal(table["tile_id"].to_numpy(), expected["tile_id"].to_numpy())
        assert np.isfinite(store.read_bag(record.slide_id).features).all()
    errors = {e["slide_id"]: e for e in store.errors()}
    assert set(errors) == set(BAD)
    expect = {"missing": "file not found", "not_tiff": "not a TIFF file", "truncated": "truncated or corrupt TIFF",
              "bad_jpeg": "corrupt JPEG tile", "white": "tissue"}
    for slide_id, words in expect.items():
        cause = errors[slide_id]["cause"]
        assert f"slide {slide_id!r}" in cause and words in cause, errors[slide_id]
    assert errors["bad_jpeg"]["stage"] == "extract" and errors["missing"]["stage"] == "index"
    assert not list(store.directory.glob(".*.tmp"))
    # A rerun skips the finished slides and fails the bad ones again, with nothing new written.
    again = extract_features(records, store, config)
    assert again.slides_skipped_done == len(ok) and again.slides_written == 0
    assert again.slides_failed == sorted(BAD)


def test_every_error_is_one_of_ours():
    for kind in (SlideError, NoTissueError, ManifestError, ConfigError, StoreError):
        assert issubclass(kind, HnmError)
