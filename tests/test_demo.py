"""Demo cohort: manifest and splits, masks, determinism, OpenSlide compatibility, CLI."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from hnm_ray.demo import main
from hnm_ray.slides import SlideReader
from hnm_ray.config import JobConfig, MILConfig
from hnm_ray.slides.synthetic import MASK_DOWNSAMPLE, cohort_plan, make_demo_cohort


def _rows(manifest: Path) -> list[dict]:
    with manifest.open() as f:
        return list(csv.DictReader(f))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifest_and_stratified_splits(demo_cohort):
    rows = _rows(demo_cohort)
    assert list(rows[0]) == ["slide_id", "path", "label", "split", "annotation"]
    assert len(rows) == 8 and len({r["slide_id"] for r in rows}) == 8
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        labels = sorted(r["label"] for r in rows if r["split"] == split)
        assert labels == ["0"] * (n // 2) + ["1"] * (n // 2), split
    for r in rows:
        assert not Path(r["path"]).is_absolute() and (demo_cohort.parent / r["path"]).is_file()
        assert bool(r["annotation"]) == (r["label"] == "1")
        if r["annotation"]:
            assert r["annotation"] == f"slides/{r['slide_id']}_mask.png"


def test_the_default_demo_cohort_has_enough_test_slides_for_its_auc_to_mean_something():
    """The built-in demo had 4 test slides: its AUC moved 0.5 <-> 1.0 on one slide. The default cohort (what
    `python -m hnm_ray.train` makes without a manifest, planned here without rendering) has >= 16 test slides, half
    tumour, and as many validation slides, where the epoch and threshold are picked: at least mil.min_val_bags of
    each class, so the demo job picks them on validation as a real run does (64 slides gave 8 of each: the MIL
    stage's small-validation fallback, and its warning, in every round of the demo)."""
    job = JobConfig()
    labels, mimics, splits = cohort_plan(job.demo_slides, job.seed)
    splits = np.asarray(splits)
    for split in ("test", "val"):
        assert np.sum((splits == split) & (labels == 1)) >= 8 and np.sum((splits == split) & (labels == 0)) >= 8
    fewest_val = min(np.sum((splits == "val") & (labels == label)) for label in (0, 1))
    assert fewest_val >= MILConfig().min_val_bags
    assert mimics[labels == 0].sum() == np.sum(labels == 0) // 2  # tumour mimics in half of the normal slides


def test_masks_align_with_level0(demo_cohort):
    from PIL import Image

    for r in (r for r in _rows(demo_cohort) if r["annotation"]):
        mask = np.asarray(Image.open(demo_cohort.parent / r["annotation"]))
        with SlideReader(demo_cohort.parent / r["path"]) as slide:
            w, h = slide.info.level_dimensions[0]
            tissue = slide.thumbnail(w // MASK_DOWNSAMPLE)
        assert mask.shape == (h // MASK_DOWNSAMPLE, w // MASK_DOWNSAMPLE)
        tumour = mask > 0
        assert 0.005 < tumour.mean() < 0.15
        assert tissue[tumour].mean() < 200                   # the masked area is stained, not background
        assert (tissue[tumour].mean(0)[2] > tissue[tumour].mean(0)[1])   # purple: blue above green


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_slides_open_as_svs_pyramids(demo_cohort, backend):
    for r in _rows(demo_cohort):
        with SlideReader(demo_cohort.parent / r["path"], backend=backend) as slide:
            assert slide.info.level_count == 3
            assert slide.info.mpp == pytest.approx(0.5)
            assert slide.info.level_dimensions[0] == (2048, 1536)


def test_openslide_sees_aperio_vendor(demo_cohort):
    openslide = pytest.importorskip("openslide")
    path = demo_cohort.parent / _rows(demo_cohort)[0]["path"]
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.level_count == 3
        assert "thumbnail" in slide.associated_images


def test_deterministic_for_a_seed(tmp_path):
    a = make_demo_cohort(tmp_path / "a", n_slides=2, seed=5, size=768)
    b = make_demo_cohort(tmp_path / "b", n_slides=2, seed=5, size=768)
    c = make_demo_cohort(tmp_path / "c", n_slides=2, seed=6, size=768)
    assert _digests(a.parent) == _digests(b.parent)
    assert _digests(a.parent) != _digests(c.parent)


def test_cli_prints_manifest(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--slides", "2", "--size", "512", "--seed", "1"])
    out = capsys.readouterr().out
    assert str(tmp_path / "cli" / "manifest.csv") in out
    assert len(_rows(tmp_path / "cli" / "manifest.csv")) == 2


def test_cli_rejects_bad_sizes(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--size", "100"])
