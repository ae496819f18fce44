"""Tile encoders looked up by name (timm-style registry), plus `module:callable` and TorchScript plug-ins.

Built-ins: `resnet18_in` (the paper's f: ResNet-18 with instance norm, 512-d after global average
pooling, parameter names as in torchvision so torchvision-layout checkpoints load) and `small_cnn`
(128-d, fast enough for CPU demos); foundation models by `hf-hub:` / `timm:` name (hnm_ray.models.foundation).
Every encoder maps float (B, 3, H, W) tiles from `to_model_input` (in its `InputSpace`) to (B, out_dim)
features. Weights come from local files only (`hnm_ray.models.weights`); the built-in CNNs are in
`hnm_ray.models.cnn`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hnm_ray.config import EncoderConfig
from hnm_ray.core.errors import ConfigError
from hnm_ray.models import foundation
from hnm_ray.models.cnn import ResNetIN, SmallCNN
from hnm_ray.models.foundation import is_timm_spec
from hnm_ray.models.weights import file_digest, load_weights
from hnm_ray.core.registry import Registry, build_plugin, names_code
from hnm_ray.store.manifest import safe_name

EncoderFactory = Callable[[], nn.Module]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROBE_SIZE = 224


ENCODERS: Registry[EncoderFactory] = Registry("encoder")
register_encoder = ENCODERS.register


def list_encoders() -> list[str]:
    """Names of the registered encoders."""
    return ENCODERS.names()


INSTANCE_NORMS = {"affine": True, "plain": False}  # plain: no scale/shift parameters, as in the official code
INPUT_SPACES = ("rgb_imagenet", "bgr01")


@register_encoder("resnet18_in")
def resnet18_in(norm: str = "affine") -> nn.Module:
    """ResNet-18 with instance norm, 512-d features (the paper's f); norm "affine" (ours) or "plain" (official)."""
    if norm not in INSTANCE_NORMS:
        raise ConfigError("encoder.norm", f"unknown instance norm {norm!r}; choose one of {sorted(INSTANCE_NORMS)}")
    return ResNetIN((2, 2, 2, 2), affine=INSTANCE_NORMS[norm])


@register_encoder("small_cnn")
def small_cnn() -> nn.Module:
    """Four stride-2 conv blocks with instance norm, 128-d features: the CPU demo encoder."""
    return SmallCNN()


def build_encoder(spec: str, weights: str | Path | None = None, norm: str = "affine",
                  hub_cache: str | None = None, hub_revision: str | None = None) -> nn.Module:
    """An encoder with `.out_dim` from a registry name, an `hf-hub:` / `timm:` name (weights from `hub_cache`, the
    local Hugging Face cache, at `hub_revision`, or `weights`), a `module.path:callable` plug-in or a TorchScript
    file; `norm` other than "affine" is passed to registry encoders that take it (resnet18_in)."""
    if is_timm_spec(spec):
        return foundation.build(foundation.recipe(spec, weights, hub_cache, hub_revision))
    if spec in ENCODERS:
        model = _registered(spec, norm)
    elif names_code(spec) and Path(spec).expanduser().is_file():
        model = _load_torchscript(Path(spec).expanduser())
    elif ":" in spec:
        model = _load_plugin(spec)
    else:
        raise ConfigError("encoder.name", f"unknown encoder {spec!r}; use one of {list_encoders()}, hf-hub:ORG/NAME, "
                                     "timm:ARCH, a plug-in 'module.path:callable', or the path of a TorchScript file")
    if weights is not None:
        load_weights(model, weights)
    if getattr(model, "out_dim", None) is None:
        model.out_dim = probe_out_dim(model, spec)
    return model


def _registered(spec: str, norm: str) -> nn.Module:
    """A registry encoder, with `norm` when it is not the default."""
    try:
        return ENCODERS[spec](**({} if norm == "affine" else {"norm": norm}))
    except TypeError as exc:
        raise ConfigError("encoder.norm", f"encoder {spec!r} has no norm option ({exc}); use resnet18_in or "
                                          "leave encoder.norm at affine") from exc


def _load_plugin(spec: str) -> nn.Module:
    """Call the `callable` of a `module.path:callable` spec; it must return an nn.Module."""
    model = build_plugin(spec, "encoder.name")
    if not isinstance(model, nn.Module):
        raise ConfigError("encoder.name", f"plug-in {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_torchscript(path: Path) -> nn.Module:
    """A TorchScript encoder saved with torch.jit.save, loaded on the CPU."""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ConfigError("encoder.name", f"{path} is not a TorchScript file ({exc}); save the encoder with "
                                     "torch.jit.save(torch.jit.script(model), path)") from exc


def probe_out_dim(model: nn.Module, spec: str) -> int:
    """Feature size of `model`, found by one forward pass on a 1x3x224x224 tile."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    except Exception as exc:  # noqa: BLE001 - any failure of a user's model becomes a config error naming it
        raise ConfigError("encoder.name", f"{spec!r} fails on a 1x3x{PROBE_SIZE}x{PROBE_SIZE} input: {exc}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("encoder.name", f"{spec!r} must return (B, D) features, got {shape}; pool/flatten in the model")
    return int(out.shape[1])


def encoder_tag(spec: str, weights: str | Path | None = None) -> str:
    """A safe folder name for features of this encoder: sanitized spec (+ short hash of the weights file / TorchScript)."""
    script = Path(spec).expanduser()
    parts = [safe_name(script.stem), file_digest(script)] if script.is_file() else [safe_name(spec.replace(":", "-"))]
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise ConfigError("encoder.weights", f"file {str(weights_path)!r} not found; pass a local state_dict/checkpoint file")
        parts.append(file_digest(weights_path))
    return "-".join(parts)


@dataclasses.dataclass(frozen=True)
class InputSpace:
    """What an encoder's input looks like: channel order and scale (`kind`, encoder.input_space), the RGB mean/std of
    rgb_imagenet, and the side tiles are resized to (None: as they are)."""

    kind: str = "rgb_imagenet"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    size: int | None = None

    def describe(self) -> dict[str, Any]:
        """The store metadata of this input space."""
        return {"input_space": self.kind, "mean": list(self.mean), "std": list(self.std), "input_size": self.size}


def resolved(config: EncoderConfig) -> EncoderConfig:
    """The section with an `hf-hub:` / `timm:` encoder's own preprocessing (mean, std, input size) and an `hf-hub:`
    model's cached revision (the snapshot its weights come from) filled in where unset, as the run's config records
    them (other encoders: unchanged), so --resume and predict read the same weights after the cache is updated. The
    cache folder is not filled in: each machine finds its own at use (encoder.hub_cache, else HF_HUB_CACHE /
    HF_HOME), so a run's config resumes and predicts elsewhere. Reads the model's config.json from the local cache:
    ConfigError naming the download command when it is missing."""
    from_hub = foundation.hub_repo(config.name) is not None and not config.weights
    if not is_timm_spec(config.name) or (config.mean and config.std and config.input_size
                                         and (config.hub_revision or not from_hub)):
        return config
    plan = foundation.recipe(config.name, config.weights, config.hub_cache, config.hub_revision)
    return dataclasses.replace(config, mean=config.mean or list(plan.mean), std=config.std or list(plan.std),
                               input_size=config.input_size or plan.input_size,
                               hub_revision=config.hub_revision or plan.revision or None)


def with_cache(config: EncoderConfig) -> EncoderConfig:
    """`resolved`, with an `hf-hub:` encoder's cache folder as this process finds it filled in where unset: what
    extraction hands its encoder actors, so they read the files the driver checked (never recorded in a config)."""
    config = resolved(config)
    if foundation.hub_repo(config.name) is None or config.hub_cache:
        return config
    return dataclasses.replace(config, hub_cache=foundation.hf_cache_dir())


def input_space_of(config: EncoderConfig) -> InputSpace:
    """The InputSpace of an `encoder` section (its own preprocessing for `hf-hub:` / `timm:` encoders)."""
    config = resolved(config)
    return InputSpace(config.input_space, tuple(config.mean or IMAGENET_MEAN), tuple(config.std or IMAGENET_STD),
                      config.input_size)


def encoder_out_dim(config: EncoderConfig) -> int:
    """The feature size of the section's encoder, cheaply for `hf-hub:` / `timm:` models (their config and weights
    files found, the architecture traced on the meta device: no weights loaded); other encoders are built."""
    if is_timm_spec(config.name):
        return foundation.out_dim(foundation.recipe(config.name, config.weights, config.hub_cache,
                                                    config.hub_revision))
    return encoder_from_config(config).out_dim


def encoder_from_config(config: EncoderConfig, weights: str | Path | None = None) -> nn.Module:
    """The encoder of an `encoder` config section (weights: `weights` when given, else config.weights), with its
    `input_space` (an InputSpace)."""
    config = resolved(config if weights is None else dataclasses.replace(config, weights=str(weights)))
    model = build_encoder(config.name, config.weights, config.norm, config.hub_cache, config.hub_revision)
    model.input_space = input_space_of(config)
    return model


def is_pretrained(config: EncoderConfig) -> bool:
    """True when the encoder starts from pretrained weights: encoder.weights, or an `hf-hub:` model's own."""
    return bool(config.weights) or foundation.hub_repo(config.name) is not None


def config_tag(config: EncoderConfig, weights: str | Path | None = None) -> str:
    """`encoder_tag` of an `encoder` config section; non-default norm, input space and precision are part of the
    name (features of another precision never mix with these), and so are a non-default mean/std/input size (a short
    hash) and an `hf-hub:` model's cached revision."""
    defaults = EncoderConfig()
    extras = [v for v, d in ((config.norm, defaults.norm), (config.input_space, defaults.input_space),
                             (config.precision, defaults.precision)) if v != d]
    weights = weights if weights is not None else config.weights
    space = input_space_of(config)
    if space != InputSpace(config.input_space):
        extras.append("p" + hashlib.sha256(json.dumps(space.describe(), sort_keys=True).encode()).hexdigest()[:8])
    repo = foundation.hub_repo(config.name)
    if repo is not None and weights is None:
        extras.append((resolved(config).hub_revision or "")[:10])
    return "-".join([encoder_tag(config.name, weights), *extras])


def autocast(device: str | torch.device, precision: str):
    """The context the encoder's forward runs in: torch autocast to bfloat16 on `device`'s type (AMP; CPUs too),
    or nothing for float32 (`encoder.precision`)."""
    import contextlib

    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, precision))


def to_model_input(tiles: torch.Tensor | np.ndarray, input_space: InputSpace | str = "rgb_imagenet") -> torch.Tensor:
    """uint8 RGB tiles (B, H, W, 3) on any device -> float32 (B, 3, H, W) in the encoder's input space.

    "rgb_imagenet" (ours): RGB normalized with the space's mean/std (ImageNet's unless the encoder has its own).
    "bgr01" (official ItS2CLR/HNM-WSI, which reads tiles with cv2.imread): BGR channel order, values in [0, 1], no
    normalisation. Tiles of another side than the space's `size` are resized to it (bilinear, antialiased).
    """
    space = InputSpace(input_space) if isinstance(input_space, str) else input_space
    if isinstance(tiles, np.ndarray):
        tiles = torch.from_numpy(np.ascontiguousarray(tiles))
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != torch.uint8:
        raise ValueError(f"expected uint8 tiles of shape (B, H, W, 3), got {tiles.dtype} {tuple(tiles.shape)}")
    if space.kind not in INPUT_SPACES:
        raise ConfigError("encoder.input_space", f"unknown input space {space.kind!r}; choose one of {list(INPUT_SPACES)}")
    # Channels first while still uint8 (a quarter of the bytes to move), then float arithmetic in place.
    if space.kind == "bgr01":
        return _resized(tiles.flip(-1).permute(0, 3, 1, 2).contiguous().float().div_(255.0), space.size)
    mean = torch.tensor(space.mean, device=tiles.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(space.std, device=tiles.device).view(1, 3, 1, 1) * 255.0
    return _resized(tiles.permute(0, 3, 1, 2).contiguous().float().sub_(mean).div_(std), space.size)


def _resized(batch: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, 3, H, W) resized to (B, 3, size, size) (bilinear, antialiased), or as it is when it has that side."""
    if size is None or batch.shape[-2:] == (size, size):
        return batch
    return torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)
