"""Importing TRIDENT / CLAM / STAMP h5 feature files into the store, exporting it as TRIDENT h5, and MIL on them."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pyarrow as pa
import pytest

from hnm_ray.config import MILConfig
from hnm_ray.core.errors import StoreError
from hnm_ray.import_features import export_trident, import_h5, main
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest
from hnm_ray.training.mil import fit_mil

N_TILES, DIM, PATCH = 20, 16, 256


def slide_arrays(i: int, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) float32 (positive slides: a shifted cluster of tiles) and level-0 corners on a 5-wide grid."""
    rng = np.random.default_rng(i)
    features = rng.normal(size=(N_TILES, DIM)).astype(np.float32)
    if positive:
        features[:5] += 3.0
    grid = np.arange(N_TILES)
    coords = np.stack([grid % 5, grid // 5], axis=1) * PATCH + 1000 * i
    return features, coords.astype(np.int64)


def write_h5(path, fmt: str, features: np.ndarray, coords: np.ndarray, mpp: float = 0.5) -> None:
    """One slide in the layout `fmt`'s own extraction code writes."""
    with h5py.File(path, "w") as h5:
        if fmt == "trident":  # trident/IO.py save_h5: coords attrs from the patcher
            h5["features"], h5["coords"] = features, coords
            h5["coords"].attrs.update({"patch_size": PATCH, "patch_size_level0": PATCH, "level0_magnification": 20,
                                       "target_magnification": 20, "overlap": 0, "name": path.stem})
        elif fmt == "clam":  # CLAM extract_features_fp compute_w_loader: save_hdf5(attr_dict=None), int32 coords
            h5["features"], h5["coords"] = features, coords.astype(np.int32)
        else:  # STAMP preprocessing: feats float16, coords float micrometres, file attrs
            h5["feats"], h5["coords"] = features.astype(np.float16), coords * mpp
            h5.attrs.update({"extractor": "uni", "unit": "um", "tile_size_um": PATCH * mpp, "tile_size_px": 224,
                             "feat_type": "tile"})


@pytest.mark.parametrize("fmt", ["trident", "clam", "stamp"])
def test_import_reads_back_the_same_bags(fmt, tmp_path):
    folder = tmp_path / "h5"
    folder.mkdir()
    expected = {}
    for i in range(3):
        expected[f"slide_{i}"] = slide_arrays(i)
        write_h5(folder / f"slide_{i}.h5", fmt, *expected[f"slide_{i}"])
    store = FeatureStore(tmp_path / "store", "uni_v1")
    summary = import_h5(sorted(folder.glob("*.h5")), store, fmt, mpp=0.5 if fmt == "stamp" else None,
                        patch_size=PATCH if fmt == "clam" else None)  # CLAM's feature files record no patch size

    assert summary.written == sorted(expected) and not summary.failed
    for slide_id, (features, coords) in expected.items():
        bag = store.read_bag(slide_id)
        want = features.astype(np.float16).astype(np.float32) if fmt == "stamp" else features
        np.testing.assert_array_equal(bag.features, want)
        np.testing.assert_array_equal(bag.coords, coords)
        np.testing.assert_array_equal(bag.tile_ids, np.arange(N_TILES))
        assert (bag.truth == -1).all()
    meta = store.metadata()
    assert meta["source_format"] == fmt and meta["tile_size"] == PATCH and meta["level"] == 0 and meta["dim"] == DIM
    assert meta["encoder"] == ("uni" if fmt == "stamp" else "")
    assert import_h5(sorted(folder.glob("*.h5")), store, fmt, mpp=0.5).skipped == sorted(expected)


@pytest.mark.parametrize("damage, words", [
    (lambda h5: h5.__delitem__("coords"), ["bad.h5", "'coords'"]),
    (lambda h5: (h5.__delitem__("coords"), h5.create_dataset("coords", data=np.zeros((7, 2)))), ["bad.h5", "(20, 2)"]),
    (lambda h5: h5["features"].__setitem__((3, 4), np.nan), ["bad.h5", "'features'", "NaN"]),
    (lambda h5: h5["coords"].attrs.__setitem__("patch_size_level0", "big"), ["bad.h5", "not a number"]),
])
def test_a_malformed_file_is_named_recorded_and_skipped(damage, words, tmp_path):
    folder = tmp_path / "h5"
    folder.mkdir()
    for name in ("good", "bad"):
        write_h5(folder / f"{name}.h5", "trident", *slide_arrays(1))
    with h5py.File(folder / "bad.h5", "a") as h5:
        damage(h5)
    store = FeatureStore(tmp_path / "store", "t")
    summary = import_h5(sorted(folder.glob("*.h5")), store, "trident")

    assert summary.written == ["good"] and list(summary.failed) == ["bad"]
    assert all(w in summary.failed["bad"] for w in words), summary.failed["bad"]
    assert [(e["slide_id"], e["stage"]) for e in store.errors()] == [("bad", "import")]
    assert store.completed() == {"good"}


def test_missing_mpp_or_patch_size_and_a_bad_file_name_are_clear_errors(tmp_path):
    folder = tmp_path / "h5"
    folder.mkdir()
    write_h5(folder / "ok.h5", "stamp", *slide_arrays(0))
    write_h5(folder / "has space.h5", "stamp", *slide_arrays(1))
    with pytest.raises(StoreError, match="--mpp"):  # before any file is read
        import_h5(sorted(folder.glob("*.h5")), FeatureStore(tmp_path / "store", "t"), "stamp")
    failed = import_h5(sorted(folder.glob("*.h5")), FeatureStore(tmp_path / "store", "t"), "stamp", mpp=0.5).failed
    assert list(failed) == ["has space"] and "rename the file" in failed["has space"]

    write_h5(folder / "clam.h5", "clam", *slide_arrays(2))
    failed = import_h5([folder / "clam.h5"], FeatureStore(tmp_path / "store", "c"), "clam").failed
    assert "--patch-size" in failed["clam"]


def test_store_to_trident_h5_and_back_gives_the_same_features(tmp_path):
    store = FeatureStore(tmp_path / "store", "ours")
    for i in range(2):
        features, coords = slide_arrays(i)
        tiles = pa.table({"tile_id": np.arange(N_TILES, dtype=np.int32) * 3, "x": coords[:, 0], "y": coords[:, 1],
                          "level": np.zeros(N_TILES, np.int8), "size": np.full(N_TILES, PATCH, np.int16)})
        store.write_slide(f"s{i}", tiles, features.astype(np.float16))
    assert main(["--store", str(tmp_path / "store"), "--tag", "ours", "--export", str(tmp_path / "out")]) == 0
    with h5py.File(tmp_path / "out" / "s0.h5") as h5:
        assert h5["coords"].attrs["patch_size_level0"] == PATCH and h5["features"].dtype == np.float16

    assert main(["--store", str(tmp_path / "back"), "--tag", "ours", "--format", "trident",
                 "--h5-dir", str(tmp_path / "out")]) == 0
    back = FeatureStore(tmp_path / "back", "ours")
    for slide_id in ("s0", "s1"):
        mine, theirs = store.read_bag(slide_id), back.read_bag(slide_id)
        np.testing.assert_array_equal(theirs.features, mine.features)
        np.testing.assert_array_equal(theirs.coords, mine.coords)



def test_export_never_writes_through_a_link_out_of_its_folder(tmp_path):
    """A planted `.s0.h5.tmp` link in the export folder pointing elsewhere: refused before any h5 is written (h5py
    would truncate and fill the link's target)."""
    store = FeatureStore(tmp_path / "store", "ours")
    features, coords = slide_arrays(0)
    tiles = pa.table({"tile_id": np.arange(N_TILES, dtype=np.int32), "x": coords[:, 0], "y": coords[:, 1],
                      "level": np.zeros(N_TILES, np.int8), "size": np.full(N_TILES, PATCH, np.int16)})
    store.write_slide("s0", tiles, features)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".s0.h5.tmp").symlink_to(victim)
    assert main(["--store", str(tmp_path / "store"), "--tag", "ours", "--export", str(tmp_path / "out")]) == 2
    assert victim.read_text() == "keep me"

@pytest.fixture(scope="module")
def imported_mil(tmp_path_factory):
    """The README's recipe: import into <root>/<tag>/round=0 (the manifest's paths name the h5 files: no slide
    images), then the aggregator trains on those bags. (folder, records, store, MILResult)"""
    tmp_path = tmp_path_factory.mktemp("imported")
    folder = tmp_path / "h5"
    folder.mkdir()
    rows = ["slide_id,path,label,split"]
    for i in range(8):
        write_h5(folder / f"s{i}.h5", "trident", *slide_arrays(i, positive=bool(i % 2)))
        rows.append(f"s{i},h5/s{i}.h5,{i % 2},{'train' if i < 6 else 'val'}")  # no slides: paths name the h5 files
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    records = load_manifest(tmp_path / "slides.csv")
    store = FeatureStore(tmp_path / "store", "uni_v1", round=0)
    import_h5(sorted(folder.glob("*.h5")), store, "trident")
    result = fit_mil(MILConfig(ensemble=1, workers=0, epochs=3, checkpoint_every=3), store, records, tmp_path / "run", seed=0)
    return tmp_path, records, store, result


def test_mil_trains_on_an_imported_store(imported_mil):
    tmp_path, _, _, result = imported_mil
    meta = json.loads((tmp_path / "run" / "mil_aggregator.json").read_text())
    assert [h["epoch"] for h in result.history] == [0, 1, 2] and meta["dim"] == DIM
    assert np.isfinite([h["train_loss"] for h in result.history]).all()


def test_heatmaps_and_qupath_files_of_an_imported_store_need_no_slide_image(imported_mil, caplog):
    """Issue 23/25: imported features without their slides got no QuPath file and no heatmap (each slide was skipped
    with a warning, the slide could not be opened). Level-0 tiles need no slide: the QuPath squares come from the
    store's coordinates and tile size, the heatmap is drawn on a blank canvas; one warning names the slides."""
    from PIL import Image

    from hnm_ray.report.slides import Thresholds, write_slide_outputs

    tmp_path, records, store, result = imported_mil
    out = tmp_path / "outputs"
    pictures = {"s1": out / "heatmaps" / "s1.png", "s2": out / "heatmaps" / "s2.png"}
    scored = write_slide_outputs(result.model_path, store, records, out / "qupath", pictures, Thresholds(0.5, 0.5))
    assert sorted(s.record.slide_id for s in scored) == [f"s{i}" for i in range(8)]
    for i in range(8):
        features = json.loads((out / "qupath" / f"s{i}.geojson").read_text())["features"]
        _, coords = slide_arrays(i)
        corners = [f["geometry"]["coordinates"][0] for f in features]
        assert [c[0] for c in corners] == coords.astype(float).tolist()  # tile i's top-left corner, level 0
        assert all(c[2] == [c[0][0] + PATCH, c[0][1] + PATCH] for c in corners)  # the tile's level-0 square
    for path in pictures.values():
        with Image.open(path) as picture:
            assert picture.size[0] > 200
    assert "8 slide(s) without a slide image" in caplog.text


def test_a_slide_skipped_while_scoring_is_not_counted_as_drawn_from_the_store(imported_mil, caplog, monkeypatch):
    """A slide without its image whose scoring then fails (e.g. tiles not at level 0) is logged as skipped and left
    out of the 'drawn from the store' warning: it got no QuPath file."""
    import hnm_ray.report.slides as slides
    from hnm_ray.core.errors import SlideError

    tmp_path, records, store, result = imported_mil
    score_slide = slides.score_slide

    def failing_on_s3(model, store, record, *args):
        if record.slide_id == "s3":
            raise SlideError("s3", "its tiles are not at level 0")
        return score_slide(model, store, record, *args)

    monkeypatch.setattr(slides, "score_slide", failing_on_s3)
    out = tmp_path / "outputs_skip"
    scored = slides.write_slide_outputs(result.model_path, store, records, out / "qupath", {}, slides.Thresholds(0.5, 0.5))
    assert "s3" not in {s.record.slide_id for s in scored} and not (out / "qupath" / "s3.geojson").exists()
    assert "7 slide(s) without a slide image" in caplog.text


def test_mil_eval_chunk_tiles_is_saved_with_the_model_and_chunked_evaluation_equals_whole_bags(imported_mil):
    """The knob reaches every scoring path through the model file: fit_mil saves mil.eval_chunk_tiles in its JSON,
    load_aggregator sets it, and the store's bags evaluated 6 tiles at a time give the whole bags' probabilities."""
    from hnm_ray.models.inference import evaluate_bags, load_aggregator, read_bags

    _, records, store, result = imported_mil
    model, meta = load_aggregator(result.model_path)
    assert meta["eval_chunk_tiles"] == model.eval_chunk == MILConfig.eval_chunk_tiles
    # The scoring machine's own setting wins where the caller gives one (predict passes its --mil.eval_chunk_tiles).
    assert load_aggregator(result.model_path, eval_chunk=5)[0].eval_chunk == 5
    whole_probs, whole_logits = evaluate_bags(model, read_bags(store, records))
    model.eval_chunk = 6  # 20-tile bags: 4 chunks
    probs, logits = evaluate_bags(model, read_bags(store, records))
    np.testing.assert_allclose(probs, whole_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(logits), np.concatenate(whole_logits), rtol=1e-5, atol=1e-5)
