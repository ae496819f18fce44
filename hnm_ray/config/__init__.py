"""The one config tree of hnm-ray (sections of knobs) and the machinery that loads it from recipes, YAML and flags."""
from hnm_ray.config.sections import FinetuneConfig, JobConfig, MILConfig, MiningConfig, TrainConfig
from hnm_ray.config.tile_sections import EncoderConfig, ExtractConfig, PretrainConfig, TilingConfig, TissueConfig
from hnm_ray.config.files import load_recipe, load_yaml, mask_secrets, merge, recipe_names, save_yaml, to_tree
from hnm_ray.config.tree import (add_arguments, add_source_arguments, add_trust_argument, changed_knobs, check_choice,
                                 check_range, from_tree, given_knobs, knob, leaves, load_config, refuse_code, section)

__all__ = [
    "EncoderConfig", "ExtractConfig", "FinetuneConfig", "JobConfig", "MILConfig", "MiningConfig", "PretrainConfig",
    "TilingConfig", "TissueConfig", "TrainConfig", "add_arguments", "add_source_arguments", "add_trust_argument",
    "changed_knobs", "check_choice", "check_range", "from_tree", "given_knobs", "knob", "leaves", "load_config",
    "load_recipe", "load_yaml", "mask_secrets", "merge", "recipe_names", "refuse_code", "save_yaml", "section", "to_tree",
]
