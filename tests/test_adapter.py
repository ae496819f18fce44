"""Hard negative mining on frozen features (`finetune.scope adapter`): the adapter round on an imported store reads no
slide, round r + 1's store is adapter(round 0's), its SupCon loss falls on separable features, full fine-tuning is
refused on imported features, and predict applies a run's adapter."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from _support import kept_store, small_config
from test_import_features import slide_arrays, write_h5

from hnm_ray.core.errors import ConfigError
from hnm_ray.import_features import import_h5
from hnm_ray.models.inference import load_aggregator
from hnm_ray.predict import main as predict_main
from hnm_ray.predict import predict
from hnm_ray.slides.reader import SlideReader
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest
from hnm_ray import train
from hnm_ray.train import check_inputs, initial_encoder, round_features, with_encoder_preprocessing
from hnm_ray.training.adapter import ResidualAdapter, fit_adapter, load_adapter
from hnm_ray.training.finetune_rows import tile_rows
from hnm_ray.training.official_steps import HARD_NEGATIVE, POSITIVE


@pytest.fixture
def imported(tmp_path):
    """8 TRIDENT h5 slides (positive slides: 5 shifted tiles) imported into a store; a manifest naming the h5 files."""
    folder = tmp_path / "h5"
    folder.mkdir()
    rows = ["slide_id,path,label,split"]
    for i in range(8):
        write_h5(folder / f"s{i}.h5", "trident", *slide_arrays(i, positive=bool(i % 2)))
        rows.append(f"s{i},h5/s{i}.h5,{i % 2},{'train' if i < 6 else 'test'}")
    (tmp_path / "slides.csv").write_text("\n".join(rows) + "\n")
    store = FeatureStore(tmp_path / "store", "uni_v1", round=0)
    import_h5(sorted(folder.glob("*.h5")), store, "trident")
    return store, load_manifest(tmp_path / "slides.csv"), tmp_path / "slides.csv"


@pytest.fixture
def no_slides(monkeypatch):
    """Opening any slide fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a slide was opened")

    monkeypatch.setattr(SlideReader, "__init__", refuse)


def slide_metadata(table) -> dict:
    """The hnm-ray metadata a slide's feature file carries."""
    from hnm_ray.store.features import METADATA_KEY

    return json.loads(table.schema.metadata[METADATA_KEY])


def test_adapter_round_on_imported_features_reads_no_slide_and_writes_adapter_of_round0(imported, no_slides, tmp_path):
    store, records, _ = imported
    config = small_config({"finetune": {"scope": "adapter", "epochs_per_round": 6, "warmup_epochs": 0,
                                        "batch_size": 16, "lr": 0.05}, "run": {"rounds": 1}})
    train = [r for r in records if r.split == "train"]
    hard = [(r.slide_id, t) for r in train if r.label == 0 for t in range(5)]
    positives = [(r.slide_id, t) for r in train if r.label == 1 for t in range(5)]  # the shifted (tumour) tiles

    def table(pairs, **extra):
        return pa.table({"slide_id": [s for s, _ in pairs], "tile_id": pa.array([t for _, t in pairs], pa.int32()),
                         **{k: pa.array(np.full(len(pairs), v, np.float32)) for k, v in extra.items()}})

    rows = tile_rows(store, records, [(table(hard), HARD_NEGATIVE),
                                      (table(positives, pos_rank=0.1, score=0.9), POSITIVE)], seed=0)
    out = fit_adapter(config, rows, store, None, None, None, tmp_path, "finetune_round0", 0, 6, 6)

    losses = [h["ft_loss"] for h in out.history]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]  # SupCon on the adapter learns the separable rows
    round1 = FeatureStore(tmp_path / "run_features", "run-adapted", round=1)
    assert round_features(config, records, round1, store, None, out.adapter_weights, tmp_path)["slides_written"] == 8
    adapter = load_adapter(out.adapter_weights)
    for record in records:
        before, after = store.read_table(record.slide_id), round1.read_table(record.slide_id)
        for column in ("tile_id", "x", "y", "level", "size", "truth"):
            assert after[column].equals(before[column])
        source = store.read_bag(record.slide_id).features
        with torch.no_grad():
            expected = adapter(torch.from_numpy(source)).numpy()
        np.testing.assert_allclose(round1.read_bag(record.slide_id).features, expected, rtol=1e-6, atol=1e-6)
        assert not np.allclose(expected, source, atol=1e-3)  # the trained adapter is not the identity
        # each slide keeps its own metadata (an imported slide's source file), not the first slide's
        assert slide_metadata(after)["source_file"] == slide_metadata(before)["source_file"] == f"{record.slide_id}.h5"
    assert round1.metadata()["dim"] == store.metadata()["dim"]


def test_full_fine_tuning_on_imported_features_is_refused_before_any_work(imported, no_slides, tmp_path):
    store, records, manifest = imported
    tree = {"run": {"manifest": str(manifest), "store": str(store.root), "store_tag": "uni_v1", "rounds": 1}}
    with pytest.raises(ConfigError, match="--finetune.scope adapter") as error:
        check_inputs(small_config(tree))
    assert "finetune.scope" in str(error.value) and "trident" in str(error.value)
    adapter = small_config({**tree, "finetune": {"scope": "adapter"}})
    assert [r.slide_id for r in check_inputs(adapter)] == [r.slide_id for r in records]
    # Round 0 of such a job: no encoder (no SimCLR warm start on slides), nothing extracted.
    assert initial_encoder(adapter, records, tmp_path, state=None) is None
    assert round_features(adapter, records, store, store, None, None, tmp_path) is None
    # Its checkpoint says so, and predict (which extracts with the run's encoder: it has none) refuses it.
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "meta.json").write_text(json.dumps({"imported_features": "trident"}))
    with pytest.raises(ConfigError, match="imported from trident"):
        predict(tmp_path / "run", manifest, tmp_path / "pred")


def test_imported_features_never_look_up_the_encoder(imported, no_slides):
    """No encoder runs on imported features: check_inputs takes the feature size from the store and the run's config
    keeps its encoder section as given (an hf-hub: name that is not cached is never looked up)."""
    store, records, manifest = imported
    config = small_config({"run": {"manifest": str(manifest), "store": str(store.root), "store_tag": "uni_v1"},
                           "finetune": {"scope": "adapter"}, "encoder": {"name": "hf-hub:hnm-test/not-cached"}})
    assert [r.slide_id for r in check_inputs(config)] == [r.slide_id for r in records]
    assert with_encoder_preprocessing(config) == config


def test_a_store_tag_naming_another_encoders_store_is_refused_before_any_work(demo_cohort, tmp_path):
    """--run.store_tag may name an imported store (no encoder: above) or one extracted with this run's encoder and
    settings; a store of another encoder or preprocessing is refused, naming what differs."""
    from hnm_ray.extract import store_metadata
    from hnm_ray.models.encoders import encoder_out_dim

    def stored_by(config, tag: str) -> None:  # one slide file as extract_features writes it with `config`
        dim = encoder_out_dim(config.encoder)
        store = FeatureStore(tmp_path / "store", tag)
        tiles = pa.table({k: np.zeros(2, np.int32) for k in ("tile_id", "x", "y", "level", "size")})
        store.write_slide("s", tiles, np.zeros((2, dim), np.float32), metadata=store_metadata(config, store, dim))

    run = {"manifest": str(demo_cohort), "store": str(tmp_path / "store")}
    stored_by(small_config({"encoder": {"name": "resnet18_in"}}), "resnet")
    stored_by(small_config({"encoder": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}), "other_mean")
    stored_by(small_config(), "same")
    for tag, words in (("resnet", "encoder: 'resnet18_in' there, 'small_cnn' here"), ("other_mean", "mean: ")):
        with pytest.raises(ConfigError, match="run.store_tag") as error:
            check_inputs(small_config({"run": {**run, "store_tag": tag}}))
        assert words in str(error.value) and "Drop --run.store_tag" in str(error.value)
    assert check_inputs(small_config({"run": {**run, "store_tag": "same"}}))


def test_resume_refuses_to_switch_the_finetune_scope(tmp_path, monkeypatch):
    """The run's state.json records finetune.scope at its start; a --resume with the other scope is refused before
    anything of the run is rewritten (its config.yaml kept) and before Ray starts."""
    def stop(*args, **kwargs):
        raise AssertionError("the job went on to start Ray")

    monkeypatch.setattr(train, "route_ray_logs", stop)  # the first step of a job after its checks and records
    run = tmp_path / "run"
    with pytest.raises(AssertionError, match="start Ray"):
        train.run_job(small_config({"finetune": {"scope": "full"}}), run, records=[])
    assert json.loads((run / "state.json").read_text())["finetune_scope"] == "full"
    saved = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="started with --finetune.scope full") as error:
        train.run_job(small_config({"finetune": {"scope": "adapter"}}), run, records=[])
    assert "Resume with --finetune.scope full" in str(error.value) and (run / "config.yaml").read_text() == saved
    with pytest.raises(AssertionError, match="start Ray"):  # the same scope resumes
        train.run_job(small_config({"finetune": {"scope": "full"}}), run, records=[])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_applies_the_runs_adapter(ray_session, tiny_run, demo_cohort, tmp_path):
    """The tiny run's checkpoint given an adapter: predict scores aggregator(adapter(encoder(tile))), the run's own
    kept features through the adapter, and not the features without it."""
    assert tiny_run.done.returncode == 0, tiny_run.done.stderr[-3000:]
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run / "checkpoint", run / "checkpoint")
    shutil.copy(tiny_run.run / "config.yaml", run / "config.yaml")
    store = kept_store(tiny_run.run)
    torch.manual_seed(0)
    adapter = ResidualAdapter(int(store.metadata()["dim"]), 8)
    torch.nn.init.normal_(adapter.up.weight, std=0.5)
    save_file(adapter.state_dict(), str(run / "checkpoint" / "adapter.safetensors"))
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    (run / "checkpoint" / "meta.json").write_text(json.dumps({**meta, "adapter_weights": "adapter.safetensors"}))
    test = [r for r in load_manifest(demo_cohort) if r.split == "test"]
    manifest = tmp_path / "test.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "path", "label", "split"],
                                 *[[r.slide_id, r.path, r.label, r.split] for r in test]])

    assert predict_main(["--checkpoint", str(run), "--slides", str(manifest), "--out", str(tmp_path / "pred"),
                         "--no-heatmaps"]) == 0
    with (tmp_path / "pred" / "summary.csv").open() as f:
        predicted = {row["slide_id"]: float(row["probability"]) for row in csv.DictReader(f)}
    model, _ = load_aggregator(run / "checkpoint" / "aggregator")
    for record in test:
        features = torch.from_numpy(store.read_bag(record.slide_id).features)
        with torch.no_grad():
            with_adapter = torch.sigmoid(model(adapter.eval()(features))[1]).item()
            without = torch.sigmoid(model(features)[1]).item()
        assert predicted[record.slide_id] == pytest.approx(with_adapter, abs=1e-4)
        assert abs(with_adapter - without) > 1e-3
