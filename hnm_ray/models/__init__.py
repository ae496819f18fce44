"""Models: tile encoders (registry in `encoders`) and MIL aggregators."""
from hnm_ray.models.encoders import build_encoder, encoder_tag, list_encoders, register_encoder, to_model_input

__all__ = ["build_encoder", "encoder_tag", "list_encoders", "register_encoder", "to_model_input"]
