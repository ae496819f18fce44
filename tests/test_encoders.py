"""Encoder registry, built-in encoders, plug-ins (module:callable, TorchScript), weights and tags."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from hnm_ray.core.errors import ConfigError
from hnm_ray.models import encoders
from hnm_ray.models.encoders import (IMAGENET_MEAN, IMAGENET_STD, build_encoder, encoder_tag, list_encoders,
                                     register_encoder, to_model_input)

PLUGIN = textwrap.dedent('''
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, stride=4)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return torch.flatten(self.pool(self.conv(x)), 1)


    def make_tiny():
        return Tiny()


    def make_not_a_module():
        return "nope"


    def make_map():
        return nn.Conv2d(3, 2, 3)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> str:
    """Name of a throwaway plug-in module importable from sys.path."""
    (tmp_path / "hnm_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "hnm_test_plugin", raising=False)
    return "hnm_test_plugin"


def _tiles(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def test_registry_lists_builtins_and_rejects_duplicates(monkeypatch):
    assert {"resnet18_in", "small_cnn"} <= set(list_encoders())
    monkeypatch.setattr(encoders.ENCODERS, "_factories", dict(encoders.ENCODERS._factories))

    @register_encoder("tiny_linear")
    def tiny_linear() -> nn.Module:
        model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model.out_dim = 3
        return model

    assert "tiny_linear" in list_encoders()
    assert build_encoder("tiny_linear")(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("small_cnn")(tiny_linear)
    with pytest.raises(ConfigError, match="unknown encoder 'resnet99'.*resnet18_in"):
        build_encoder("resnet99")


@pytest.mark.parametrize("name,dim", [("resnet18_in", 512), ("small_cnn", 128)])
@pytest.mark.parametrize("size", [224, 256])
def test_builtin_encoders_give_out_dim_features_for_224_and_256_tiles(name, dim, size):
    torch.manual_seed(0)
    model = build_encoder(name).eval()
    assert model.out_dim == dim
    with torch.no_grad():
        out = model(to_model_input(_tiles(2, size)))
    assert out.shape == (2, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_resnet18_in_is_resnet18_with_affine_instance_norm():
    model = build_encoder("resnet18_in")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 20 and all(m.affine for m in norms)
    assert sum(p.numel() for p in model.parameters()) == 11_176_512  # torchvision resnet18 minus its fc layer
    assert not any(name.startswith("fc") for name, _ in model.named_parameters())
    assert "layer2.0.downsample.1.weight" in model.state_dict()  # torchvision key layout


def test_module_callable_plugin_gets_out_dim_from_a_probe(plugin):
    model = build_encoder(f"{plugin}:make_tiny")
    assert model.out_dim == 5 and model.training
    assert model(to_model_input(_tiles(3, 256))).shape == (3, 5)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_encoder(f"{plugin}:make_not_a_module")
    with pytest.raises(ConfigError, match=r"must return \(B, D\) features"):
        build_encoder(f"{plugin}:make_map")
    with pytest.raises(ConfigError, match="cannot load plug-in"):
        build_encoder(f"{plugin}:missing")
    with pytest.raises(ConfigError, match="cannot load plug-in"):
        build_encoder("hnm_no_such_module_xyz:make")


def test_torchscript_round_trip(tmp_path, plugin):
    torch.manual_seed(0)
    model = build_encoder("small_cnn").eval()
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = build_encoder(str(path)).eval()
    assert loaded.out_dim == 128
    x = to_model_input(_tiles(2, 224))
    torch.testing.assert_close(loaded(x), model(x))
    tiny = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(build_encoder(f"{plugin}:make_tiny")), str(tiny))
    assert build_encoder(str(tiny)).out_dim == 5
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="not a TorchScript file"):
        build_encoder(str(tmp_path / "junk.pt"))


def test_weights_load_from_checkpoint_dicts_with_prefixes(tmp_path):
    torch.manual_seed(1)
    source = build_encoder("small_cnn").eval()
    x = to_model_input(_tiles(2, 224))
    expected = source(x)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "ddp.pth"
    torch.save(source.state_dict(), plain)
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        torch.manual_seed(2)
        torch.testing.assert_close(build_encoder("small_cnn", str(path)).eval()(x), expected)
    head = tmp_path / "simclr.pth"  # encoder under a prefix + a projection head the encoder ignores
    torch.save({"state_dict": {**{f"encoder.{k}": v for k, v in source.state_dict().items()},
                               "head.0.weight": torch.zeros(4, 128)}}, head)
    torch.testing.assert_close(build_encoder("small_cnn", str(head)).eval()(x), expected)


def test_weights_saved_without_instance_norm_affine_params_load(tmp_path):
    source = build_encoder("small_cnn")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("features.1.")}
    torch.save(state, tmp_path / "no_affine.pth")
    model = build_encoder("small_cnn", str(tmp_path / "no_affine.pth"))
    assert torch.equal(model.features[1].weight, torch.ones(16)) and torch.equal(model.features[0].weight,
                                                                                  source.features[0].weight)


def test_missing_or_unfitting_weights_raise_config_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'encoder.weights'.*not found.*never downloaded") as info:
        build_encoder("small_cnn", str(tmp_path / "missing.pth"))
    assert info.value.key == "encoder.weights"
    torch.save(build_encoder("small_cnn").state_dict(), tmp_path / "small.pth")
    with pytest.raises(ConfigError, match="does not fit this encoder: .*missing key.*'conv1.weight'") as info:
        build_encoder("resnet18_in", str(tmp_path / "small.pth"))
    assert info.value.key == "encoder.weights"
    wide = {k: torch.cat([v, v]) if k == "features.0.weight" else v
            for k, v in build_encoder("small_cnn").state_dict().items()}
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match=r"shape mismatch.*features.0.weight \(32, 3, 3, 3\) vs \(16, 3, 3, 3\)"):
        build_encoder("small_cnn", str(tmp_path / "wide.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="junk.pth cannot be used"):
        build_encoder("small_cnn", str(tmp_path / "junk.pth"))


def test_encoder_tag_is_a_safe_name_that_tracks_the_weights_file(tmp_path):
    from hnm_ray.store.manifest import name_problem

    assert encoder_tag("resnet18_in") == "resnet18_in"
    assert encoder_tag("my.pkg/enc:make model") == "my.pkg_enc-make_model"
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    first = encoder_tag("resnet18_in", str(weights))
    assert first.startswith("resnet18_in-") and len(first) == len("resnet18_in-") + 10
    assert encoder_tag("resnet18_in", str(weights)) == first
    weights.write_bytes(b"two")
    assert encoder_tag("resnet18_in", str(weights)) != first
    script = tmp_path / "my encoder.pt"
    script.write_bytes(b"scripted")
    assert encoder_tag(str(script)).startswith("my_encoder-")
    assert all(name_problem(t) is None for t in (first, encoder_tag(str(script)), encoder_tag("a:b")))
    with pytest.raises(ConfigError, match="weights"):
        encoder_tag("resnet18_in", str(tmp_path / "missing.pth"))


def test_to_model_input_normalizes_on_the_input_device():
    tiles = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    tiles[..., 0] = 255
    out = to_model_input(tiles)
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32 and out.is_contiguous()
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], rel=1e-5)
    assert out[1, 2, 3, 4].item() == pytest.approx(-IMAGENET_MEAN[2] / IMAGENET_STD[2], rel=1e-5)
    torch.testing.assert_close(to_model_input(tiles.numpy()), out)
    assert to_model_input(torch.zeros(1, 8, 8, 3, dtype=torch.uint8, device="meta")).device.type == "meta"
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(torch.zeros(1, 8, 8, 3))
