"""The contrastive model fine-tuning trains: the encoder f with ItS2CLR's projection head, built from the config and
weights files, wrapped for the loop's precision."""
from __future__ import annotations

from hnm_ray.config import EncoderConfig
from hnm_ray.core.errors import HnmError
from hnm_ray.core.registry import one_line


def projection_head(in_dim: int, out_dim: int):
    """The SupCon projection head of ItS2CLR: in -> in -> out with a ReLU."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def build_contrastive(encoder: EncoderConfig, weights: str | None, head_weights: str | None, proj_dim: int):
    """Encoder (from `weights`) + projection head, the head from `head_weights` when given (the SimCLR checkpoint's
    head in round 0, the previous round's after): HnmError naming the file when it does not fit."""
    from hnm_ray.models.encoders import encoder_from_config

    model = encoder_from_config(encoder, weights)
    return contrastive_model(model, load_head(model.out_dim, proj_dim, head_weights), encoder.precision)


def load_head(dim: int, proj_dim: int, head_weights: str | None):
    """A `projection_head(dim, proj_dim)`, from `head_weights` when given (a state dict, loaded with
    weights_only: no code runs): HnmError naming the file when it does not fit."""
    import torch

    head = projection_head(dim, proj_dim)
    if head_weights:
        try:
            head.load_state_dict(torch.load(head_weights, map_location="cpu", weights_only=True))
        except RuntimeError as exc:
            raise HnmError(f"projection head {head_weights} does not fit a {dim} -> {dim} -> {proj_dim} head "
                           f"({one_line(exc)}); set --finetune.proj_dim to the checkpoint's") from exc
    return head


def contrastive_model(encoder, head, precision: str = "float32"):
    """Encoder + projection head as one module (one forward, so DDP can wrap it); the forward runs in `precision`
    (`encoder.precision`: bfloat16 = autocast) and returns float32 projections, so the loss is computed in float32."""
    import torch.nn as nn

    from hnm_ray.models.encoders import autocast

    class EncoderWithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = encoder, head

        def forward(self, x):
            with autocast(x.device, precision):
                return self.head(self.encoder(x)).float()

    return EncoderWithHead()
