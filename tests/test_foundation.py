"""Foundation-model encoders by name (hnm_ray.models.foundation): a tiny timm ViT in the Hugging Face cache layout,
loaded offline by its hf-hub: name, extracts features end to end with its own preprocessing; a model that is not
cached fails with one clear error before any extraction; the known models' table builds in timm."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _support import small_config, store_for
from hnm_ray.core.errors import ConfigError
from hnm_ray.models import foundation
from hnm_ray.models.encoders import build_encoder, config_tag, encoder_from_config
from hnm_ray.store.manifest import load_manifest

timm = pytest.importorskip("timm")  # the test extra installs it: this skips only outside the README's install

TILE = 224
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "num_classes": 0}
# Two cached models: the same architecture, each with its own preprocessing (neither ImageNet's nor the tile size).
MODELS = {"hnm-test/tiny-vit": ((0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32),
          "hnm-test/tiny-vit-b": ((0.6, 0.6, 0.6), (0.1, 0.2, 0.1), 48)}


def _cache_model(hub: Path, repo: str, seed: int) -> torch.nn.Module:
    """A tiny timm ViT saved as `hf download` leaves it: models--ORG--NAME/{refs/main, snapshots/<rev>/...}."""
    from safetensors.torch import save_file

    mean, std, size = MODELS[repo]
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, "img_size": size}).eval()
    folder = hub / f"models--{repo.replace('/', '--')}"
    revision = f"{seed:040x}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 0, "model_args": {**TINY, "img_size": size},
        "pretrained_cfg": {"input_size": [3, size, size], "mean": list(mean), "std": list(std), "crop_pct": 1.0}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "model.safetensors"))
    return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face home holding the two tiny models: (HF_HOME, {repo: the model as saved})."""
    home = tmp_path_factory.mktemp("hf_home")
    return home, {repo: _cache_model(home / "hub", repo, seed) for seed, repo in enumerate(MODELS, start=1)}


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HOME at the test cache, HF_HUB_OFFLINE=1, no HF_HUB_CACHE: what the README tells an offline machine."""
    monkeypatch.setenv("HF_HOME", str(hub[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return hub[1]


def _config(name: str, manifest: Path | None = None, **encoder):
    """The small test config with the encoder `name` (one encoder actor: each actor imports timm)."""
    run = {"run": {"manifest": str(manifest)}} if manifest else {}
    return small_config({"encoder": {"name": name, **encoder}, "extract": {"num_encoders": 1}, **run})


@pytest.fixture(scope="module")
def records(demo_cohort):
    return load_manifest(demo_cohort, require_labels=False)[:2]


def test_hub_model_extracts_end_to_end_offline_with_its_own_preprocessing(ray_session, offline, records, tmp_path):
    from hnm_ray.slides.reader import open_slide

    from hnm_ray.extract import extract_features

    config = _config("hf-hub:hnm-test/tiny-vit")
    store = store_for(tmp_path, config)
    summary = extract_features(records, store, config)
    assert summary.slides_written == len(records) and not summary.slides_failed
    meta = store.metadata()
    mean, std, size = MODELS["hnm-test/tiny-vit"]
    assert (meta["mean"], meta["std"], meta["input_size"], meta["dim"]) == (list(mean), list(std), size, 24)
    assert meta["encoder"] == "hf-hub:hnm-test/tiny-vit" and f"{1:040x}"[:10] in store.encoder_tag  # the revision
    # The stored rows are the cached model (its weights, not a random init) on tiles normalised with ITS mean/std and
    # resized to ITS input size, computed here with torch alone.
    model = offline["hnm-test/tiny-vit"]
    bag = store.read_bag(records[0].slide_id)
    rows = np.arange(min(4, len(bag)))
    with open_slide(records[0].path, slide_id=records[0].slide_id, device="cpu") as reader:
        tiles = torch.from_numpy(reader.read_tiles(bag.coords[rows], TILE, level=0)).permute(0, 3, 1, 2).float()
    pixels = (tiles / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
    with torch.inference_mode():
        direct = model(pixels).numpy()
    np.testing.assert_allclose(bag.features[rows], direct, atol=1e-4, rtol=0)


def test_two_encoders_preprocessing_differs_in_the_store_tag_and_metadata(offline, tmp_path):
    """What extract_features writes into each slide file's metadata (store_metadata) and the store folder's tag, for
    two cached models of one architecture and for one model with another mean: never the same store."""
    from hnm_ray.extract import store_metadata
    from hnm_ray.models.encoders import resolved

    configs = {name: _config(f"hf-hub:{name}") for name in MODELS}
    configs["other mean"] = _config("hf-hub:hnm-test/tiny-vit", mean=[0.1, 0.1, 0.1])
    stores = {name: store_for(tmp_path, config) for name, config in configs.items()}
    metas = {name: store_metadata(dataclasses.replace(config, encoder=resolved(config.encoder)), stores[name], 24)
             for name, config in configs.items()}
    assert len({store.directory for store in stores.values()}) == 3
    for name, (mean, std, size) in MODELS.items():
        assert (metas[name]["mean"], metas[name]["std"], metas[name]["input_size"]) == (list(mean), list(std), size)
    assert metas["other mean"]["mean"] == [0.1, 0.1, 0.1] and metas["other mean"]["std"] == list(MODELS["hnm-test/tiny-vit"][1])


def test_the_runs_config_names_no_cache_folder_so_resume_and_predict_read_their_own_hf_home(offline, hub, tmp_path,
                                                                                            monkeypatch):
    """config.yaml of an hf-hub: run, read on another machine (--resume, predict) whose cache is elsewhere: the
    model is found in that machine's HF_HOME, not at the first machine's path."""
    from hnm_ray import config as cfg
    from hnm_ray.config import TrainConfig
    from hnm_ray.train import with_encoder_preprocessing

    first = tmp_path / "first_machine"
    shutil.copytree(hub[0], first)
    monkeypatch.setenv("HF_HOME", str(first))
    cfg.save_yaml(with_encoder_preprocessing(_config("hf-hub:hnm-test/tiny-vit")), tmp_path / "config.yaml")
    shutil.rmtree(first)
    monkeypatch.setenv("HF_HOME", str(hub[0]))
    saved = cfg.from_tree(TrainConfig, cfg.load_yaml(tmp_path / "config.yaml"))
    assert saved.encoder.hub_cache is None and saved.encoder.input_size == MODELS["hnm-test/tiny-vit"][2]
    pixels = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(encoder_from_config(saved.encoder).eval()(pixels).numpy(),
                                   offline["hnm-test/tiny-vit"](pixels).numpy(), atol=1e-6, rtol=0)


def test_a_run_reads_its_recorded_hub_revision_after_the_cache_is_updated(offline, demo_cohort, tmp_path, monkeypatch):
    """The cache gets a new snapshot between a run and its --resume / predict (refs/main moves): the run's config
    names its revision, so the old snapshot's weights are read while cached, and one clear error names the command
    that restores it once it is gone; a new run takes the new snapshot."""
    from hnm_ray import config as cfg
    from hnm_ray.config import TrainConfig
    from hnm_ray.train import check_inputs, with_encoder_preprocessing

    repo, home = "hnm-test/tiny-vit", tmp_path / "hf_home"
    before = _cache_model(home / "hub", repo, seed=1)
    monkeypatch.setenv("HF_HOME", str(home))
    run = with_encoder_preprocessing(_config(f"hf-hub:{repo}", demo_cohort))
    cfg.save_yaml(run, tmp_path / "config.yaml")
    _cache_model(tmp_path / "update" / "hub", repo, seed=5)  # `hf download` of a newer commit: a new snapshot
    cached = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tmp_path / "update" / "hub" / cached.name / "snapshots" / f"{5:040x}",
                    cached / "snapshots" / f"{5:040x}")
    (cached / "refs" / "main").write_text(f"{5:040x}")

    saved = cfg.from_tree(TrainConfig, cfg.load_yaml(tmp_path / "config.yaml"))
    assert saved.encoder.hub_revision == f"{1:040x}"
    assert config_tag(saved.encoder) == config_tag(run.encoder)  # round 0's store of the run
    pixels = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(encoder_from_config(saved.encoder).eval()(pixels).numpy(), before(pixels).numpy(),
                                   atol=1e-6, rtol=0)
    assert with_encoder_preprocessing(_config(f"hf-hub:{repo}")).encoder.hub_revision == f"{5:040x}"
    shutil.rmtree(cached / "snapshots" / f"{1:040x}")
    with pytest.raises(ConfigError, match=f"hf download {repo} --revision {1:040x}") as error:
        check_inputs(saved)
    assert f"{5:040x} as main now" in str(error.value) and "start a new run" in str(error.value)


def test_a_model_not_in_the_cache_fails_in_check_inputs_naming_the_download_command(hub, offline, demo_cohort):
    from hnm_ray.train import check_inputs

    for repo in ("hnm-test/absent", "MahmoodLab/UNI"):  # a gated model that was never downloaded: the same error
        config = _config(f"hf-hub:{repo}", demo_cohort)
        with pytest.raises(ConfigError) as err:
            check_inputs(config)
        message = str(err.value)
        assert f"hf download {repo}" in message and f"huggingface-cli download {repo}" in message
        assert "HF_HUB_OFFLINE=1" in message and "HF_HOME" in message and str(hub[0] / "hub") in message
    config = _config("hf-hub:owkin/phikon-v2", demo_cohort)
    with pytest.raises(ConfigError, match="transformers model"):
        check_inputs(config)


def test_check_inputs_does_not_load_the_weights(offline, demo_cohort, monkeypatch):
    """check_inputs finds the files and traces the architecture on the meta device: the weights are read once, by
    each encoder actor, never by the driver (a 1B-parameter model would cost seconds and GBs twice)."""
    from hnm_ray.train import check_inputs

    def refuse(*args, **kwargs):
        raise AssertionError("weights read in check_inputs")

    monkeypatch.setattr("hnm_ray.models.weights.read_weights", refuse)
    config = _config("hf-hub:hnm-test/tiny-vit", demo_cohort)
    assert len(check_inputs(config)) == 8


def test_timm_architecture_with_a_weights_file_and_random_init(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    torch.save({"model": source.state_dict()}, tmp_path / "vit.pth")  # a torch checkpoint, read weights_only
    loaded = build_encoder("timm:test_vit", weights=tmp_path / "vit.pth")
    assert loaded.out_dim == source.num_features
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    space = encoder_from_config(_config("timm:test_vit").encoder).input_space  # timm's default preprocessing
    assert (space.size, space.mean) == (160, (0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="no architecture 'not_a_vit'"):
        build_encoder("timm:not_a_vit")


def test_pretrained_encoder_skips_the_warm_start_and_the_random_init_warning(offline, caplog, tmp_path):
    from hnm_ray.train import initial_encoder

    config = small_config({"encoder": {"name": "hf-hub:hnm-test/tiny-vit"}, "pretrain": {"method": "simclr"}})
    state = type("NoState", (), {"once": lambda *a: pytest.fail("the SimCLR warm start ran")})()
    with caplog.at_level("WARNING", logger="hnm_ray"):
        assert initial_encoder(config, [], tmp_path, state) is None  # the model's own weights
    assert "random init" not in caplog.text


def test_class_and_mean_patch_output_skips_the_register_tokens():
    """Virchow/Virchow2's rule: [class token, mean of the patch tokens], registers (Virchow2: 4) left out."""
    torch.manual_seed(0)
    plan = foundation.TimmRecipe("vit_tiny_patch16_224", {**TINY, "reg_tokens": 3}, "class_and_mean",
                                 (0.5,) * 3, (0.5,) * 3, 32, None)
    model = foundation.build(plan).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.model.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 4:].mean(1)], dim=-1)  # 1 class + 3 registers, 16 patches
        assert tokens.shape[1] == 1 + 3 + 16 and model.out_dim == 48
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("repo", [r for r, m in foundation.KNOWN.items() if m.arch and r != "bioptimus/h-optimus-1"])
def test_known_models_build_in_timm_with_the_stated_feature_size(repo):
    """The table's architecture + kwargs as timm builds them (on the meta device: no memory, no weights); H-optimus-1
    has H-optimus-0's."""
    entry = foundation.KNOWN[repo]
    plan = foundation.TimmRecipe(entry.arch, entry.kwargs, entry.output, entry.mean, entry.std, entry.input_size, None)
    assert foundation.out_dim(plan) == entry.dim


def test_a_cached_config_cannot_point_timm_at_other_files(tmp_path, monkeypatch):
    """A cached config.json is data: an architecture naming another source (hf-hub:, local-dir:) is refused, and
    model_args that make timm load or fetch a file (checkpoint_path, pretrained...) are dropped."""
    from hnm_ray.models import foundation

    home = tmp_path / "hf"
    _cache_model(home / "hub", "hnm-test/tiny-vit", 3)
    config = next((home / "hub").glob("models--hnm-test--tiny-vit/snapshots/*/config.json"))
    data = json.loads(config.read_text())
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config.write_text(json.dumps({**data, "model_args": {**data["model_args"], "checkpoint_path": str(tmp_path / "x"),
                                                          "pretrained": True}}))
    kwargs = foundation.recipe("hf-hub:hnm-test/tiny-vit").kwargs
    assert not {"checkpoint_path", "pretrained"} & set(kwargs) and kwargs["embed_dim"] == TINY["embed_dim"]
    for arch in ("hf-hub:someone/else", "local-dir:/tmp/elsewhere"):
        config.write_text(json.dumps({**data, "architecture": arch}))
        with pytest.raises(ConfigError, match="points timm at another model"):
            foundation.recipe("hf-hub:hnm-test/tiny-vit")
