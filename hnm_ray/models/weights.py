"""Encoder weights files: read (safetensors, or a torch checkpoint with weights only: no code runs), write (safetensors)
and load into a model with one clear error when they do not fit; the official SimCLR checkpoint's encoder and
projection head; a file's short digest (in encoder tags)."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hnm_ray.core.errors import ConfigError
from hnm_ray.core.registry import one_line

log = logging.getLogger("hnm_ray")

STATE_DICT_KEYS = ("model", "state_dict", "encoder")
SAFETENSORS_SUFFIX = ".safetensors"
OFFICIAL_HEAD_PREFIX = "fc."


def _state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint: itself, or under a 'model' / 'state_dict' / 'encoder' key."""
    while isinstance(checkpoint, dict):
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
        inner = next((checkpoint[k] for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(f"no state_dict found (top level: {keys}); save model.state_dict() or "
                     f"{{'model': model.state_dict()}}")


def _prefix(state: dict[str, torch.Tensor], wanted: list[str]) -> str:
    """The key prefix ('', 'module.', 'encoder.', ...) under which `state` holds every key in `wanted`."""
    first = wanted[0]
    candidates = {k[: len(k) - len(first)] for k in state if k == first or k.endswith("." + first)}
    fitting = sorted(p for p in candidates if all(p + k in state for k in wanted))
    if len(fitting) > 1 and "" not in fitting:
        raise ValueError(f"several encoders in the file (key prefixes {fitting}); save the one you want as a plain state_dict")
    return fitting[0] if fitting else min(candidates, key=len, default="")


def is_safetensors(path: str | Path) -> bool:
    """True for a safetensors file: by its suffix, or by its header (8-byte little-endian length, then a JSON object)."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an encoder weights file: safetensors, or a torch checkpoint read with weights_only=True (tensors
    and plain containers only, so no pickled code runs); ValueError saying what was expected when it is neither."""
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path))
        return _state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - unpickling/parsing errors come in many types; all mean "not weights"
        raise ValueError(f"expected encoder weights: a .safetensors file, or a torch state dict saved with "
                         f"torch.save(model.state_dict(), path) (read with weights_only=True); reading it failed "
                         f"with {one_line(exc)}") from exc


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as safetensors (atomically: temp file + rename); loading it back runs no code."""
    from safetensors.torch import save

    from hnm_ray.core.storage import write_bytes

    path = Path(path)
    write_bytes(save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}), path)
    return path


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file (safetensors or a torch state dict) into `model`; ConfigError('encoder.weights')
    when it is missing, unreadable or does not fit."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("encoder.weights", f"file {str(path)!r} not found; pass a local .safetensors or state_dict "
                                     "file (weights are never downloaded)")
    try:
        state = read_weights(path)
        own = model.state_dict()
        prefix = _prefix(state, list(own))
    except ValueError as exc:
        raise ConfigError("encoder.weights", f"{path} cannot be used: {exc}") from exc
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in own if k not in state and not _is_identity_norm_param(model, k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        raise ConfigError("encoder.weights", f"{path} does not fit this encoder: {len(missing)} missing key(s) {missing[:5]}, "
                                     f"{len(wrong)} shape mismatch(es) {wrong[:5]}")
    ignored = sorted(set(state) - set(own))
    if ignored:
        log.info("weights %s: ignoring %d key(s) the encoder does not have, e.g. %s", path, len(ignored), ignored[:3])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def _is_identity_norm_param(model: nn.Module, key: str) -> bool:
    """True for weight/bias of an instance norm: absent from files saved with affine=False, where 1/0 is identical."""
    owner, _, name = key.rpartition(".")
    return name in ("weight", "bias") and isinstance(model.get_submodule(owner), nn.InstanceNorm2d)


def official_simclr_state(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, projection head) state dicts in our key layout from an official ItS2CLR/HNM-WSI checkpoint.

    Official layouts: the SimCLR checkpoint {'state_dict': {'module.resnet.<torchvision resnet18 key>': ...}}
    and the fine-tuning checkpoints {'net': {'resnet.<key>' or 'module.resnet.<key>': ...}, 'optimizer': ...}.
    `resnet.fc.0.*` / `resnet.fc.2.*` are the projection head (Linear(512, 512), ReLU, Linear(512, 256)) and
    come back as `0.*` / `2.*`; keys outside `resnet.` are skipped, as the official loader does.
    """
    state = checkpoint
    if isinstance(checkpoint, dict):
        state = next((checkpoint[k] for k in ("state_dict", "net") if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict of tensors, got {type(state).__name__}")
    encoder: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("module.")
        if not name.startswith("resnet."):
            continue
        name = name.removeprefix("resnet.")
        if name.startswith(OFFICIAL_HEAD_PREFIX):
            head[name.removeprefix(OFFICIAL_HEAD_PREFIX)] = value
        else:
            encoder[name] = value
    if not encoder:
        raise ValueError(f"no 'resnet.' / 'module.resnet.' keys (first keys: {list(state)[:5]})")
    return encoder, head


def official_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The projection head (`resnet.fc.*`, as `0.*` / `2.*`) of an official SimCLR / fine-tuning checkpoint file, read
    with weights_only=True; empty for any other weights file (safetensors, a plain state dict, no head)."""
    if is_safetensors(path):
        return {}
    try:
        return official_simclr_state(torch.load(path, map_location="cpu", weights_only=True))[1]
    except Exception:  # noqa: BLE001 - unpickling/layout errors come in many types; all mean "not this layout"
        return {}


def load_official_simclr(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """Load an official SimCLR / fine-tuning checkpoint into `model` (resnet18_in); returns the projection head's state.

    Read with torch.load(weights_only=True): tensors and plain containers only, never pickled code.
    ConfigError('weights') naming every missing, unexpected or mis-shaped key when it does not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("encoder.weights", f"file {str(path)!r} not found; pass the official SimCLR checkpoint file")
    try:
        encoder_state, head_state = official_simclr_state(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types; all mean "not this layout"
        raise ConfigError("encoder.weights", f"{path} is not an official ItS2CLR/HNM-WSI checkpoint: {exc}") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in encoder_state and not _is_identity_norm_param(model, k)]
    unexpected = [k for k in encoder_state if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in encoder_state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError("encoder.weights", f"{path} does not fit this encoder: missing keys {missing}, unexpected keys "
                                     f"{unexpected}, shape mismatches {wrong}; the official encoder is "
                                     "resnet18_in with norm 'plain'")
    model.load_state_dict(encoder_state, strict=False)
    return head_state


def file_digest(path: str | Path, length: int = 10) -> str:
    """Short sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
