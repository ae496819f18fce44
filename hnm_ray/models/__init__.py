"""Models: tile encoders (registry in `encoders`), MIL aggregators, trained model files and their probabilities
(`inference`), and the slide metrics of those probabilities (`metrics`)."""
from hnm_ray.models.encoders import build_encoder, encoder_tag, list_encoders, register_encoder, to_model_input

__all__ = ["build_encoder", "encoder_tag", "list_encoders", "register_encoder", "to_model_input"]
