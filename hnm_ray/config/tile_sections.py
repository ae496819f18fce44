"""The tile side of the config tree (`TrainConfig`'s sections, declared in `hnm_ray.config.sections`):

    tiling     tile size, level or mpp, tissue fraction; tiling.tissue: tissue detection
    encoder    the tile encoder f: architecture, initial weights, norm, input space
    pretrain   the self-supervised (SimCLR) warm start
    extract    Ray Data extraction resources
"""
from __future__ import annotations

from dataclasses import dataclass

from hnm_ray.config.tree import knob, section
from hnm_ray.core.errors import ConfigError


@dataclass
class TissueConfig:
    """Tissue detection: saturation threshold (Otsu by default), blur and clean-up of the mask."""

    thumbnail_size: int = knob(1024, "longest side (px) of the thumbnail tissue is detected on", low=16)
    max_decoded_pixels: int = knob(2 ** 26, "most pixels a thumbnail may decode (one pyramid level): the thumbnail "
                                            "comes from the smallest level within it; a slide with no such level "
                                            "is refused (errors.jsonl), so a slide declaring a huge image cannot "
                                            "exhaust memory", low=16 * 16)
    saturation_threshold: float | None = knob(None, "fixed HSV-saturation threshold in [0, 1]; unset = Otsu per slide",
                                              low=0.0, high=1.0)
    min_saturation: float = knob(0.05, "floor under the Otsu threshold, so a blank (white) slide has no tissue; "
                                       "lower it for faint tissue", low=0.0, high=1.0)
    median_kernel: int = knob(7, "median blur of the saturation, in thumbnail px (odd; 1 = none)", low=1)
    min_object_fraction: float = knob(0.0005, "drop tissue pieces smaller than this fraction of the thumbnail",
                                      low=0.0, high=1.0)
    fill_holes_fraction: float = knob(0.002, "fill holes in tissue smaller than this fraction of the thumbnail",
                                      low=0.0, high=1.0)

    def validate(self) -> None:
        """Cross-checks the bounds cannot express."""
        if self.median_kernel % 2 == 0:
            raise ConfigError("tiling.tissue.median_kernel", f"{self.median_kernel} must be an odd number >= 1")


@dataclass
class TilingConfig:
    """Tiling: tile size, pyramid level or target mpp, stride and the tissue a tile must hold."""

    tile_size: int = knob(224, "tile side in pixels as the encoder sees it", low=16, high=4096)
    level: int | None = knob(0, "pyramid level to tile (ignored when mpp is set)", low=0)
    mpp: float | None = knob(None, "target microns per pixel of the tiles (0.5 = 20x, 2.0 = 5x); picks the coarsest "
                                   "level not coarser than it and reads tile_size * mpp / level_mpp px there",
                             low=0.0, low_open=True)
    fallback_mpp: float | None = knob(None, "level-0 mpp assumed for slides without MPP metadata when mpp is set "
                                            "(unset: such slides fail with a clear error)", low=0.0, low_open=True)
    stride: int | None = knob(None, "step between tiles in tile pixels (unset = tile_size: no overlap)",
                              low=0, low_open=True)
    min_tissue: float = knob(0.5, "minimum tissue fraction of a tile (0 keeps every tile touching tissue)",
                             low=0.0, high=1.0)
    tissue: TissueConfig = section(TissueConfig, "tissue detection on the slide thumbnail")

    def validate(self) -> None:
        """A level or an mpp must be set."""
        if self.level is None and self.mpp is None:
            raise ConfigError("tiling.level", "set a pyramid level (e.g. 0) or a target mpp")


@dataclass
class EncoderConfig:
    """The tile encoder f: architecture, initial weights and what its input looks like."""

    name: str = knob("small_cnn", "tile encoder: small_cnn, resnet18_in (the paper's), hf-hub:ORG/NAME or timm:ARCH "
                                  "(timm foundation models, weights from the local Hugging Face cache or "
                                  "encoder.weights: README 'Using a foundation model'), module:callable, or a "
                                  "TorchScript .pt (these two run code: from a file only with --trust-plugins)",
                      code=True)
    weights: str | None = knob(None, "initial encoder weights (safetensors or a torch state dict, ours or the "
                                     "official ItS2CLR SimCLR layout); none: a warm start by pretrain, or random init")
    norm: str = knob("affine", "resnet18_in instance norm: affine (learnable scale/shift) or plain (official: none)",
                     choices=["affine", "plain"])
    input_space: str = knob("rgb_imagenet", "encoder input: rgb_imagenet (RGB normalised with encoder.mean/std: "
                                            "ImageNet's unless the encoder has its own) or bgr01 (official: BGR in "
                                            "[0, 1], no normalisation)",
                            choices=["rgb_imagenet", "bgr01"])
    mean: list[float] | None = knob(None, "RGB mean tiles are normalised with (rgb_imagenet); unset: the encoder's own "
                                          "(hf-hub:/timm: models: their model card's; filled into the run's config), "
                                          "else ImageNet's; part of the feature store's tag")
    std: list[float] | None = knob(None, "RGB std tiles are normalised with (rgb_imagenet); unset: as encoder.mean")
    input_size: int | None = knob(None, "side in px tiles are resized to (bilinear, antialiased) before the encoder; "
                                        "unset: the encoder's own (hf-hub:/timm: models), else no resize",
                                  low=16, high=4096)
    hub_cache: str | None = knob(None, "Hugging Face cache folder hf-hub: models are read from (never downloaded; "
                                       "every node reads this path); unset: HF_HUB_CACHE, else HF_HOME/hub, else "
                                       "~/.cache/huggingface/hub, found where the run starts, resumes or predicts "
                                       "(not recorded in its config)")
    hub_revision: str | None = knob(None, "the hf-hub: model's snapshot (its commit) in the cache the weights are "
                                          "read from; unset: the one refs/main names, filled into the run's config "
                                          "so --resume and predict read the same weights after the cache is "
                                          "updated (a snapshot no longer cached stops them with the command that "
                                          "restores it)")
    precision: str = knob("float32", "encoder forward in extraction and fine-tuning: float32, or bfloat16 (torch "
                                     "autocast, AMP: faster on GPUs with bf16 tensor cores; outputs and losses stay "
                                     "float32; part of the feature store's tag)", choices=["float32", "bfloat16"])

    def validate(self) -> None:
        """mean and std: three values each, std positive."""
        for key, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != 3:
                raise ConfigError(f"encoder.{key}", f"{values} must be three values (R, G, B)")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError("encoder.std", f"{self.std} must be positive")


@dataclass
class PretrainConfig:
    """Self-supervised warm start of the encoder (SimCLR, NT-Xent) on the cohort's training tiles."""

    method: str = knob("simclr", "warm start before round 0 when no encoder.weights are given and the encoder is no "
                                 "hf-hub: model (those start pretrained): simclr (cached per cohort + encoder), or "
                                 "none (random init: features start from noise)",
                       choices=["none", "simclr"])
    epochs: int = knob(10, "SimCLR epochs (10 on the Camelyon16-regime cohort's 4,096 tiles: tile probe 0.972 +- "
                           "0.006, 3 epochs 0.955 +- 0.019, raw pixels 0.865; round-0 test instance AUC +0.035 +- "
                           "0.028 over 3 epochs, 5 seeds: benchmarks/README 'How long the warm start trains')", low=1)
    tiles: int = knob(4096, "random training tiles SimCLR trains on (at most the cohort's)", low=2)
    lr: float = knob(0.01, "SimCLR SGD learning rate (cosine over pretrain.epochs)", low=0.0, low_open=True)
    momentum: float = knob(0.9, "SimCLR SGD momentum (the other optimiser and loss knobs: finetune's)",
                           low=0.0, high=1.0, high_open=True)


@dataclass
class ExtractConfig:
    """Feature extraction resources: Ray Data decode tasks and encoder actors."""

    batch_size: int = knob(64, "tiles per decode/encode batch", low=1)
    num_encoders: int | None = knob(None, "encoder actors in the pool (default: as many as the cluster holds: one "
                                          "per gpus_per_encoder of its GPUs, else as its nodes' CPUs and memory hold)",
                                    low=1)
    gpus_per_encoder: float | None = knob(None, "GPUs per encoder actor, at most 1 (0.5: two actors share a GPU); "
                                                "default: 1 when the cluster has GPUs at the job's start, else 0 (set "
                                                "it where GPU nodes join later: an autoscaling cluster)",
                                          low=0.0, high=1.0)
    cpus_per_encoder: float = knob(1.0, "CPUs per encoder actor, and its torch threads (on CPU-only clusters more "
                                        "when its node has CPUs to spare: the node's CPUs / its encoder actors)",
                                   low=0.0, low_open=True)
    cpus_per_decoder: float = knob(0.5, "CPUs a CPU encoder actor adds for decoding its next batch (and per "
                                   "tile-index task of pre-training)", low=0.0, low_open=True)
    decode_workers: int = knob(1, "cuCIM read_region threads per decode call", low=1)
    dtype: str = knob("float32", "embedding storage dtype", choices=["float16", "float32"])


# mil.embed unset (auto): this width from this many labelled training slides on, else none (benchmarks/README).

