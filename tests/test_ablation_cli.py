"""benchmarks/ablation.py's knob overrides (--set): typed by the config tree, refused before any run starts."""
import argparse

import pytest

from benchmarks.ablation import knob_overrides
from hnm_ray.config import TrainConfig, from_tree


def test_set_knobs_reach_the_config_every_variant_is_built_from() -> None:
    tree = knob_overrides(["pretrain.tiles=8192", "pretrain.epochs=6", "mil.embed=0"], argparse.ArgumentParser())
    config = from_tree(TrainConfig, tree)
    assert (config.pretrain.tiles, config.pretrain.epochs, config.mil.embed) == (8192, 6, 0)


@pytest.mark.parametrize("item, says", [("pretrain.tile=8192", "pretrain.tile"), ("pretrain.tiles=many", "tiles"),
                                        ("tiles=8192", "SECTION.KNOB=VALUE")])
def test_a_bad_knob_stops_the_benchmark_before_it_runs(item: str, says: str, capsys) -> None:
    with pytest.raises(SystemExit):
        knob_overrides([item], argparse.ArgumentParser())
    assert says in capsys.readouterr().err
