"""Slide layer: cuCIM reader (vs tifffile and OpenSlide), bad inputs, tissue detection, tile grid, tile truth."""
from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hnm_ray.core.errors import NoTissueError, SlideError
from hnm_ray.slides import (TilingConfig, TissueConfig, load_annotation, open_slide, tile_geometry, tile_grid,
                            tile_truth, tissue_mask)
from hnm_ray.slides import reader as reader_module
from hnm_ray.slides.reader import SlideReader
from hnm_ray.slides.synthetic import MASK_DOWNSAMPLE, write_pyramid
from hnm_ray.slides.tissue import mask_fraction, median_along, otsu_threshold, saturation


def _rows(manifest: Path) -> list[dict]:
    with manifest.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rows(demo_cohort) -> list[dict]:
    return _rows(demo_cohort)


@pytest.fixture(scope="module")
def slide(demo_cohort, rows) -> Path:
    """A positive demo slide (2048 x 1536 at level 0)."""
    return demo_cohort.parent / next(r for r in rows if r["label"] == "1")["path"]


@pytest.fixture(scope="module")
def levels(slide) -> list[np.ndarray]:
    """Every pyramid level decoded whole by tifffile: the reference pixels."""
    with tifffile.TiffFile(slide) as tif:
        return [level.asarray() for level in tif.series[0].levels]


def _locations(levels: list[np.ndarray], level: int, size: int, n: int, seed: int) -> np.ndarray:
    """n random level-0 (x, y) whose tile lies inside `level` (not aligned to the 256-px JPEG tiles)."""
    h, w = levels[level].shape[:2]
    ds = levels[0].shape[1] // w
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, w - size, n), rng.integers(0, h - size, n)], 1) * ds


def _reference(levels: list[np.ndarray], level: int, locations: np.ndarray, size: int) -> np.ndarray:
    ds = levels[0].shape[1] // levels[level].shape[1]
    return np.stack([levels[level][y // ds: y // ds + size, x // ds: x // ds + size] for x, y in locations])


@pytest.mark.parametrize("backend", ["cucim", "tifffile", "openslide"])
def test_backends_agree_on_metadata(slide, backend):
    with SlideReader(slide, backend=backend) as r:
        assert r.info.backend == backend
        assert r.info.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
        assert r.info.level_downsamples == (1.0, 4.0, 16.0)
        assert r.info.level_count == 3
        assert r.info.mpp == pytest.approx(0.5)
        assert r.info.level_mpp(2) == pytest.approx(8.0)
        assert r.info.slide_id == slide.stem


@pytest.mark.parametrize("backend", ["cucim", "tifffile", "openslide"])
@pytest.mark.parametrize("level,size", [(0, 224), (1, 96)])
@pytest.mark.parametrize("batch_size,num_workers", [(1, 1), (7, 1), (7, 2)])
def test_tiles_equal_tifffile_decode(slide, levels, backend, level, size, batch_size, num_workers):
    locations = _locations(levels, level, size, 23, seed=level)
    with SlideReader(slide, backend=backend) as r:
        tiles = r.read_tiles(locations, size, level, batch_size=batch_size, num_workers=num_workers)
        single = r.read_tiles(locations[:1], size, level)
    assert tiles.dtype == np.uint8 and tiles.shape == (23, size, size, 3)
    np.testing.assert_array_equal(tiles, _reference(levels, level, locations, size))
    np.testing.assert_array_equal(single[0], tiles[0])


def test_iter_tiles_batches_stay_valid(slide, levels):
    """cuCIM reuses its batch buffer: every batch handed out must be an independent copy."""
    locations = _locations(levels, 0, 128, 50, seed=3)
    with SlideReader(slide) as r:
        batches = list(r.iter_tiles(locations, 128, batch_size=8, num_workers=2))
    assert [len(b) for b in batches] == [8] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate(batches), _reference(levels, 0, locations, 128))


def test_reader_pickles_by_reopening(slide):
    with SlideReader(slide) as r:
        clone = pickle.loads(pickle.dumps(r))
        with clone:
            assert clone.info == r.info
            np.testing.assert_array_equal(clone.read_tiles([[512, 512]], 64), r.read_tiles([[512, 512]], 64))


def test_thumbnail_fits_max_size(slide, levels):
    with SlideReader(slide) as r:
        thumb = r.thumbnail(256)
        assert thumb.shape == (192, 256, 3) and thumb.dtype == np.uint8
        big = r.thumbnail(512)  # exactly level 1: no resize
    np.testing.assert_array_equal(big, levels[1])


def test_auto_falls_back_to_tifffile_when_cucim_is_missing(slide, monkeypatch, caplog):
    monkeypatch.setattr(reader_module, "_importable", lambda module: module != "cucim")
    with caplog.at_level(logging.WARNING, logger="hnm_ray"):
        with SlideReader(slide) as r:
            assert r.info.backend == "tifffile" and r.device == "cpu"
    assert "tifffile" in caplog.text


def test_cuda_device_refused_without_gpu(slide):
    if reader_module.cuda_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(Exception, match="cuda"):
        SlideReader(slide, device="cuda")
    with SlideReader(slide) as r:
        assert r.device == "cpu"


# --- bad inputs -------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="not found") as err:
        open_slide(tmp_path / "gone.svs", slide_id="case_7")
    assert err.value.slide == "case_7"


def test_non_tiff_bytes(tmp_path):
    fake = tmp_path / "fake.svs"
    fake.write_bytes(b"<html>this is an error page, not a slide</html>" * 20)
    with pytest.raises(SlideError, match="not a TIFF") as err:
        open_slide(fake)
    assert err.value.slide == "fake"


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_tiff(slide, tmp_path, keep):
    data = slide.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideError, match="truncated") as err:
        open_slide(cut)
    assert err.value.slide == "cut"


def test_read_past_truncation_is_a_slide_error(slide, tmp_path):
    data = slide.read_bytes()
    cut = tmp_path / "half.svs"
    cut.write_bytes(data[: len(data) // 2])
    with SlideReader(cut) as r, pytest.raises(SlideError, match="cannot read"):
        r.read_tiles([[1792, 1280]], 256)


def test_compression_cucim_cannot_decode(tmp_path):
    """zstd tiles open in cuCIM but fail at read time: open_slide's validation reads a tile and says so."""
    path = tmp_path / "zstd.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), compression="zstd", photometric="rgb")
    with pytest.raises(SlideError, match="cannot read"):
        open_slide(path, backend="cucim")


def test_bad_level(slide):
    with SlideReader(slide) as r, pytest.raises(SlideError, match="level 5"):
        r.read_tiles([[0, 0]], 64, level=5)


def test_white_slide_has_no_tissue(tmp_path):
    rng = np.random.default_rng(0)
    blank = (rng.normal(242, 2.0, (1024, 1024, 3))).clip(0, 255).astype(np.uint8)
    path = write_pyramid(tmp_path / "blank.svs", blank)
    with open_slide(path) as r, pytest.raises(NoTissueError, match="blank"):
        tile_grid(r)


# --- tissue -----------------------------------------------------------------------------------------------------

def test_otsu_matches_skimage():
    skimage_filters = pytest.importorskip("skimage.filters")
    values = np.concatenate([np.random.default_rng(1).normal(m, 12, 5000) for m in (30, 140)]).clip(0, 255).astype(np.uint8)
    assert otsu_threshold(values) == pytest.approx(skimage_filters.threshold_otsu(values), abs=1)


@pytest.mark.parametrize("shape", [(64, 48), (5, 3), (2, 9)])
def test_median_along_equals_scipy_median_filter(shape):
    from scipy import ndimage

    values = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    values[:, : shape[1] // 2] //= 8  # ties and runs, as on a thumbnail
    for kernel in (1, 3, 5, 7, 9):
        for axis in (0, 1):
            size = (kernel, 1) if axis == 0 else (1, kernel)
            expected = ndimage.median_filter(values, size=size, mode="nearest")
            assert np.array_equal(median_along(values, kernel, axis), expected), (kernel, axis)


def test_tissue_mask_cleans_up():
    image = np.full((200, 200, 3), 240, np.uint8)
    image[40:160, 40:160] = (200, 120, 170)       # tissue
    image[90:96, 90:96] = 240                     # small hole: filled
    image[5:7, 5:7] = (200, 120, 170)             # speck: removed
    mask = tissue_mask(image, TissueConfig(median_kernel=1))
    assert mask[40:160, 40:160].all()
    assert mask.sum() == 120 * 120
    assert saturation(image)[0, 0] == 0


def test_tissue_mask_on_demo_thumbnail(slide):
    with SlideReader(slide) as r:
        thumb = r.thumbnail(512)
    mask = tissue_mask(thumb)
    assert 0.25 < mask.mean() < 0.65
    assert not mask[:8].any() and not mask[-8:].any()   # the demo keeps a white margin


# --- grid -------------------------------------------------------------------------------------------------------

def test_grid_covers_tissue_and_no_background(slide):
    """Every candidate tile with mostly-tissue pixels is in the grid; no grid tile is mostly white."""
    config = TilingConfig(tile_size=224)
    with open_slide(slide) as r:
        grid = tile_grid(r, config)
        w, h = r.info.level_dimensions[0]
        xs, ys = np.meshgrid(np.arange(0, w - 223, 224), np.arange(0, h - 223, 224))
        candidates = np.stack([xs.ravel(), ys.ravel()], 1)
        tiles = r.read_tiles(candidates, 224)
    pixel_tissue = (saturation(tiles) > 25).mean((1, 2))
    in_grid = {(x, y) for x, y in zip(grid["x"].to_pylist(), grid["y"].to_pylist())}
    chosen = np.array([(x, y) in in_grid for x, y in candidates])
    assert grid.num_rows == chosen.sum() > 10
    assert pixel_tissue[chosen].min() > 0.35
    assert chosen[pixel_tissue > 0.65].all()
    assert grid["tile_id"].to_pylist() == list(range(grid.num_rows))
    order = np.lexsort((grid["x"].to_numpy(), grid["y"].to_numpy()))
    assert (order == np.arange(grid.num_rows)).all()   # row-major
    assert set(grid["level"].to_pylist()) == {0} and set(grid["size"].to_pylist()) == {224}
    assert grid.schema.metadata[b"tile_mpp"] == b"0.5"


def test_grid_stride_overlaps(slide):
    with open_slide(slide) as r:
        plain = tile_grid(r, TilingConfig(tile_size=224))
        dense = tile_grid(r, TilingConfig(tile_size=224, stride=112))
    assert 3 * plain.num_rows < dense.num_rows < 5 * plain.num_rows


@pytest.mark.parametrize("mpp,level,size", [(0.5, 0, 64), (1.0, 0, 128), (2.0, 1, 64), (1.9, 0, 243), (4.0, 1, 128)])
def test_geometry_at_target_mpp(slide, mpp, level, size):
    """The coarsest level not coarser than the target mpp (5 % tolerance), read at tile_size * mpp / level_mpp px."""
    with SlideReader(slide) as r:
        got_level, got_size, extent = tile_geometry(r.info, TilingConfig(tile_size=64, mpp=mpp))
        assert (got_level, got_size) == (level, size)
        assert extent == pytest.approx(size * r.info.level_downsamples[level])
        grid = tile_grid(r, TilingConfig(tile_size=64, mpp=mpp))
        assert set(grid["size"].to_pylist()) == {size}
        first = np.stack([grid["x"].to_numpy(), grid["y"].to_numpy()], 1)[:3]
        assert r.read_tiles(first, size, level).shape == (len(first), size, size, 3)


def test_mpp_tiling_without_metadata(tmp_path):
    image = np.full((1024, 1024, 3), 240, np.uint8)
    image[200:800, 200:800] = (200, 110, 170)
    path = write_pyramid(tmp_path / "nompp.svs", image, mpp=None)
    with open_slide(path) as r:
        assert r.info.mpp is None
        with pytest.raises(SlideError, match="no MPP"):
            tile_grid(r, TilingConfig(mpp=1.0))
        grid = tile_grid(r, TilingConfig(mpp=1.0, fallback_mpp=0.25, tile_size=64))
    assert set(grid["level"].to_pylist()) == {1} and set(grid["size"].to_pylist()) == {64}   # level 1 is 1.0 um/px
    assert grid.schema.metadata[b"tile_mpp"] == b"1"


def test_tumour_tiles_are_found_by_the_grid(demo_cohort, rows):
    positives = [r for r in rows if r["label"] == "1"]
    assert positives and all(r["annotation"] for r in positives)
    for row in positives:
        with open_slide(demo_cohort.parent / row["path"]) as r:
            grid = tile_grid(r, TilingConfig(tile_size=224))
            dims = r.info.level_dimensions[0]
        mask = load_annotation(demo_cohort.parent / row["annotation"])
        assert mask.shape == (dims[1] // MASK_DOWNSAMPLE, dims[0] // MASK_DOWNSAMPLE)
        truth = tile_truth(mask, dims, grid["x"].to_numpy(), grid["y"].to_numpy(), 224)
        assert truth.dtype == np.int8 and truth.sum() >= 1, row["slide_id"]
        xs, ys = np.meshgrid(np.arange(0, dims[0] - 223, 224), np.arange(0, dims[1] - 223, 224))
        all_truth = tile_truth(mask, dims, xs.ravel(), ys.ravel(), 224)
        assert truth.sum() == all_truth.sum()   # every tumour tile is a tissue tile


def test_tile_truth_threshold():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True                           # left half of a 400 x 400 slide (mask at 1/4)
    x = np.array([0, 100, 200, 300])
    assert tile_truth(mask, (400, 400), x, np.zeros(4), 100).tolist() == [1, 1, 0, 0]
    assert tile_truth(mask, (400, 400), np.array([150]), np.array([0]), 100).tolist() == [1]   # exactly 50 %
    assert mask_fraction(mask, (400, 400), np.array([150]), np.array([0]), 100)[0] == pytest.approx(0.5)
