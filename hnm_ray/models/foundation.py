"""Foundation-model tile encoders by name: `hf-hub:ORG/NAME` (a timm model on the Hugging Face Hub, read from the local
Hugging Face cache only: never downloaded) and `timm:ARCH` (a timm architecture; weights from `--encoder.weights`).

KNOWN holds the models pathology teams use, with the timm kwargs, output rule and preprocessing their model cards give,
as TRIDENT (trident/patch_encoder_models/load.py) and STAMP (src/stamp/preprocessing/extractor/*.py) load them, and the
tile size and magnification to tile at. Other `hf-hub:` names load from their own config.json (timm's `architecture`,
`model_args`, `pretrained_cfg`). Weights files are safetensors or torch state dicts read with weights_only=True: no
code from model files ever runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hnm_ray.core.errors import ConfigError
from hnm_ray.core.registry import HUB_PREFIXES, TIMM_PREFIX, one_line

HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm pushes to the Hub, in timm's order of preference
HUB_CONFIG = "config.json"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
OUTPUTS = ("pooled", "class_and_mean")


@dataclass(frozen=True)
class FoundationModel:
    """A known tile encoder: how timm builds it, what its features are, and what its input and tiles look like."""

    title: str
    arch: str | None  # timm architecture (None: not a timm model; `not_timm` says what to do)
    kwargs: dict[str, Any] = field(default_factory=dict)  # create_model kwargs; *_layer values name timm/torch layers
    output: str = "pooled"  # pooled: timm's pooled features (the class token); class_and_mean: [class, mean patch]
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    input_size: int = 224
    tile_size: int = 224  # recommended --tiling.tile_size
    mpp: float = 0.5  # recommended --tiling.mpp (0.5 = 20x)
    dim: int = 0
    params_m: int = 0  # parameters in millions, as the model card gives them
    not_timm: str = ""


VIT_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
VIRCHOW = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "global_pool": "",
           "dynamic_img_size": True, **VIT_SWIGLU}
HOPTIMUS_KWARGS = {"num_classes": 0, "img_size": 224, "global_pool": "token", "init_values": 1e-5,
                   "dynamic_img_size": False}

# Hub repository (lower case: the Hub ignores case) -> the model. Kwargs and outputs as TRIDENT/STAMP load them.
KNOWN: dict[str, FoundationModel] = {
    "mahmoodlab/uni": FoundationModel(
        "UNI", "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                                         "dynamic_img_size": True}, dim=1024, params_m=303),
    "mahmoodlab/uni2-h": FoundationModel(
        "UNI2-h", "vit_giant_patch14_224", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                            "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                            "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                                            "dynamic_img_size": True, **VIT_SWIGLU}, dim=1536, params_m=681),
    "paige-ai/virchow": FoundationModel("Virchow", "vit_huge_patch14_224", VIRCHOW, "class_and_mean",
                                        dim=2560, params_m=632),
    "paige-ai/virchow2": FoundationModel("Virchow2", "vit_huge_patch14_224", {**VIRCHOW, "reg_tokens": 4},
                                         "class_and_mean", dim=2560, params_m=632),
    "bioptimus/h-optimus-0": FoundationModel("H-optimus-0", "vit_giant_patch14_reg4_dinov2", HOPTIMUS_KWARGS,
                                             mean=HOPTIMUS[0], std=HOPTIMUS[1], dim=1536, params_m=1100),
    "bioptimus/h-optimus-1": FoundationModel("H-optimus-1", "vit_giant_patch14_reg4_dinov2", HOPTIMUS_KWARGS,
                                             mean=HOPTIMUS[0], std=HOPTIMUS[1], dim=1536, params_m=1100),
    # TRIDENT/STAMP: resize to 256 then centre-crop 224 of a 256 px tile at 20x = the central 224 px at 0.5 mpp.
    "prov-gigapath/prov-gigapath": FoundationModel(
        "Prov-GigaPath", "vit_giant_patch14_dinov2", {"img_size": 224, "in_chans": 3, "patch_size": 16,
                                                      "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                                      "mlp_ratio": 5.33334, "num_classes": 0}, dim=1536, params_m=1130),
    "mahmoodlab/conch": FoundationModel(
        "CONCH", None, dim=512, params_m=90, not_timm=(
            "CONCH is an open_clip CoCa model, not a timm model: load it with the conch package "
            "(create_model_from_pretrained('conch_ViT-B-16', checkpoint_path=...)) in a module:callable plug-in "
            "that returns a module calling model.encode_image, or import its TRIDENT features "
            "(python -m hnm_ray.import_features)")),
    "owkin/phikon-v2": FoundationModel(
        "Phikon-v2", None, dim=1024, params_m=300, not_timm=(
            "Phikon-v2 is a Hugging Face transformers model (AutoModel), not a timm model: wrap "
            "AutoModel.from_pretrained('owkin/phikon-v2') in a module:callable plug-in whose forward returns "
            "last_hidden_state[:, 0] (1024-d, ImageNet mean/std, 224 px), or import its TRIDENT features "
            "(python -m hnm_ray.import_features)")),
}
# Not on the Hub as a stock timm model: listed for the README's table (its name is no encoder name of ours).
CTRANSPATH = FoundationModel(
    "CTransPath", None, dim=768, params_m=28, mpp=1.14, not_timm=(
        "CTransPath needs its own timm fork (a Swin-T with a convolutional stem: TRIDENT installs timm_ctp, STAMP "
        "copies the Swin code): load it in a module:callable plug-in, or import its TRIDENT/STAMP features"))


def is_timm_spec(spec: str) -> bool:
    """True for `hf-hub:ORG/NAME` and `timm:ARCH` encoder names."""
    return spec.startswith(HUB_PREFIXES) or spec.startswith(TIMM_PREFIX)


def hub_repo(spec: str) -> str | None:
    """ORG/NAME of an `hf-hub:` spec (an `@revision` suffix is not supported), else None."""
    prefix = next((p for p in HUB_PREFIXES if spec.startswith(p)), None)
    return None if prefix is None else spec[len(prefix):]


def known(spec: str) -> FoundationModel | None:
    """The KNOWN entry of an `hf-hub:` spec, else None."""
    repo = hub_repo(spec)
    return None if repo is None else KNOWN.get(repo.lower())


def hf_cache_dir() -> str:
    """The Hugging Face hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub (read when called, so a changed environment counts)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


@dataclass(frozen=True)
class HubFiles:
    """An `hf-hub:` model's files in the local cache: config.json (None when absent) and weights (None when absent)."""

    config: Path | None
    weights: Path | None

    @property
    def revision(self) -> str:
        """The cached snapshot's commit (its folder name), '' when nothing is cached."""
        found = self.config or self.weights
        return found.parent.name if found else ""


def hub_files(repo: str, cache_dir: str | None, revision: str | None = None) -> HubFiles:
    """config.json and weights of `repo` in the local cache: the snapshot of commit `revision`, else `refs/main`'s;
    never asks the network."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir or hf_cache_dir(), revision=revision)
        return Path(found) if isinstance(found, str) else None

    return HubFiles(cached(HUB_CONFIG), next(filter(None, (cached(name) for name in HUB_WEIGHTS)), None))


def missing_model_error(repo: str, cache_dir: str | None, what: str, revision: str | None = None) -> ConfigError:
    """The one error for a gated or not-downloaded model (or a run's recorded `revision` of it that the cache no
    longer holds): where we looked and how to get it there."""
    cache = cache_dir or hf_cache_dir()
    if revision:
        now = hub_files(repo, cache_dir).revision or "no snapshot"
        return ConfigError("encoder.hub_revision", (
            f"hf-hub:{repo}: {what} of revision {revision} not in the local Hugging Face cache {cache}, which holds "
            f"{now} as main now. The run's config records revision {revision} (its features and checkpoint came "
            f"from those weights): on a machine with internet run `hf download {repo} --revision {revision}` (or "
            f"`huggingface-cli download {repo} --revision {revision}`) and copy the cache folder here (HF_HOME, "
            f"HF_HUB_CACHE or --encoder.hub_cache); or start a new run to use the new weights"))
    return ConfigError("encoder.name", (
        f"hf-hub:{repo}: {what} not in the local Hugging Face cache {cache} (hnm-ray never "
        f"downloads weights). On a machine with internet (a gated model: accept its terms on "
        f"https://huggingface.co/{repo} and log in with `hf auth login` first) run `hf download {repo}` (or "
        f"`huggingface-cli download {repo}`), copy the cache folder to this machine and point HF_HOME (or "
        f"HF_HUB_CACHE, or --encoder.hub_cache) at it; set HF_HUB_OFFLINE=1 where there is no internet. Or give "
        f"the weights file: --encoder.weights FILE"))


@dataclass(frozen=True)
class TimmRecipe:
    """Everything needed to build a timm encoder: architecture, kwargs, output rule, preprocessing, weights."""

    arch: str
    kwargs: dict[str, Any]
    output: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    weights: Path | None  # None: random init (timm:ARCH without --encoder.weights)
    revision: str = ""


FILE_ARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
             "cache_dir")  # timm.create_model arguments that load or fetch weights


def recipe(spec: str, weights: str | Path | None = None, cache_dir: str | None = None,
           revision: str | None = None) -> TimmRecipe:
    """How to build `spec` (`hf-hub:` or `timm:`), from the KNOWN table, the cached config.json or timm's defaults;
    an `hf-hub:` model from the cached snapshot of commit `revision` (None: refs/main's). ConfigError naming the
    download command when that is not in the local cache."""
    file = Path(weights).expanduser() if weights is not None else None
    repo = hub_repo(spec)
    if repo is None:
        return _timm_recipe(spec.removeprefix(TIMM_PREFIX), file)
    entry = KNOWN.get(repo.lower())
    if entry is not None and entry.arch is None:
        raise ConfigError("encoder.name", f"hf-hub:{repo}: {entry.not_timm}")
    files = hub_files(repo, cache_dir, revision)
    if files.config is None and not (entry is not None and file is not None):
        raise missing_model_error(repo, cache_dir, HUB_CONFIG, revision)
    if file is None and files.weights is None:
        raise missing_model_error(repo, cache_dir, f"its weights ({' or '.join(HUB_WEIGHTS)})", revision)
    hub = _read_config(files.config) if files.config is not None else {}
    pretrained = hub.get("pretrained_cfg", {})
    arch = entry.arch if entry is not None else hub.get("architecture")
    if not arch:
        raise ConfigError("encoder.name", f"hf-hub:{repo}: its {files.config} names no timm 'architecture'; is it a "
                                          "timm model? (transformers models need a module:callable plug-in)")
    if ":" in arch:  # timm would fetch another model's config (hf-hub:) or read a folder (local-dir:): never downloaded
        raise ConfigError("encoder.name", f"hf-hub:{repo}: its {files.config} names architecture {arch!r}, which points "
                                          "timm at another model; a cached config must name a timm architecture")
    # A cached config's model_args build the architecture; keys that make timm load or fetch a file are not its to set.
    model_args = {k: v for k, v in hub.get("model_args", {}).items() if k not in FILE_ARGS}
    kwargs = {**model_args, **(entry.kwargs if entry is not None else {})}
    kwargs.setdefault("num_classes", 0)
    mean = entry.mean if entry is not None else tuple(pretrained.get("mean", IMAGENET[0]))
    std = entry.std if entry is not None else tuple(pretrained.get("std", IMAGENET[1]))
    size = entry.input_size if entry is not None else int(pretrained.get("input_size", [3, 224, 224])[-1])
    return TimmRecipe(arch, kwargs, entry.output if entry is not None else "pooled", mean, std, size,
                      file if file is not None else files.weights, files.revision if file is None else "")


def _timm_recipe(arch: str, weights: Path | None) -> TimmRecipe:
    """A `timm:ARCH` encoder: timm's default preprocessing of the architecture, pooled output."""
    import timm

    if not timm.is_model(arch.split(".")[0]):
        raise ConfigError("encoder.name", f"timm:{arch}: timm {timm.__version__} has no architecture "
                                          f"{arch.split('.')[0]!r}; list them with timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(arch)
    mean = tuple(getattr(cfg, "mean", None) or IMAGENET[0])
    std = tuple(getattr(cfg, "std", None) or IMAGENET[1])
    size = int((getattr(cfg, "input_size", None) or (3, 224, 224))[-1])
    return TimmRecipe(arch, {"num_classes": 0}, "pooled", mean, std, size, weights)


def _read_config(path: Path) -> dict[str, Any]:
    """A cached timm config.json (JSON only: nothing in it runs)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("encoder.name", f"{path}: not a readable timm config.json ({one_line(exc)}); download "
                                          "the model again") from exc


class ClassAndMeanPatch(nn.Module):
    """Virchow's tile embedding: the class token concatenated with the mean of the patch tokens (registers skipped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.model.num_prefix_tokens:].mean(1)], dim=-1)


def create(plan: TimmRecipe, device: str | torch.device = "cpu") -> nn.Module:
    """The timm model of `plan` with its output rule, random init (weights are loaded by `build`); device "meta"
    allocates nothing (for shape checks)."""
    import timm

    kwargs = {k: _layer(k, v) for k, v in plan.kwargs.items()}
    try:
        with torch.device(device):
            model = timm.create_model(plan.arch, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises many types for bad kwargs; each becomes one clear line
        raise ConfigError("encoder.name", f"timm cannot build {plan.arch!r} with {plan.kwargs}: {one_line(exc)}") from exc
    return ClassAndMeanPatch(model) if plan.output == "class_and_mean" else model


def _layer(key: str, value: Any) -> Any:
    """kwargs naming layers by string: mlp_layer from timm.layers, act_layer from torch.nn."""
    import timm.layers

    if key == "mlp_layer" and isinstance(value, str):
        return getattr(timm.layers, value)
    if key == "act_layer" and isinstance(value, str) and hasattr(nn, value):
        return getattr(nn, value)
    return value


def out_dim(plan: TimmRecipe) -> int:
    """Feature size of `plan`'s model, from a forward pass on the meta device (no memory, no weights, no compute)."""
    model = create(plan, "meta").eval()
    with torch.no_grad():
        return int(model(torch.empty(1, 3, plan.input_size, plan.input_size, device="meta")).shape[-1])


def build(plan: TimmRecipe) -> nn.Module:
    """The timm encoder of `plan` with its weights (safetensors, or a state dict read with weights_only=True)."""
    from hnm_ray.models.weights import load_weights

    model = create(plan)
    if plan.weights is not None:
        load_weights(model.model if isinstance(model, ClassAndMeanPatch) else model, plan.weights)
    model.out_dim = out_dim(plan)
    return model
