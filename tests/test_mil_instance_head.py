"""`mil.instance_head detached`: with a learnt embedding (`mil.embed`), the instance head's losses (max-instance BCE,
ranking) train the instance head alone; the embedding and the bag branch learn from the bag loss only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_mil_training import array_store

from hnm_ray.config import MILConfig
from hnm_ray.core.errors import ConfigError
from hnm_ray.models.aggregators import MILAggregator, Standardized, build_standardized
from hnm_ray.models.inference import load_aggregator
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import fit_mil


def instance_loss_gradients(name: str, detached: bool) -> dict[str, torch.Tensor | None]:
    """Gradients of the sum of one bag's instance logits, by parameter name."""
    torch.manual_seed(0)
    model = build_standardized(name, 6, embed=8, detach_instance_head=detached)
    model.train()
    instance_logits, _ = model(torch.randn(5, 6))
    instance_logits.sum().backward()
    return {key: p.grad for key, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["dsmil", "abmil", "dsmil_its2clr"])
def test_a_detached_instance_head_keeps_its_losses_out_of_the_embedding(name):
    """Shared: the instance logits' gradient reaches the embedding; detached: the instance classifier only. The
    logits themselves are the same either way."""
    shared, detached = instance_loss_gradients(name, False), instance_loss_gradients(name, True)
    assert shared["embed.0.weight"].abs().sum() > 0
    assert detached["embed.0.weight"] is None or detached["embed.0.weight"].abs().sum() == 0
    head = "aggregator.instance_classifier.weight"
    torch.testing.assert_close(detached[head], shared[head])
    torch.manual_seed(1)
    x = torch.randn(5, 6)
    torch.manual_seed(0)
    a = build_standardized(name, 6, embed=8)
    torch.manual_seed(0)
    b = build_standardized(name, 6, embed=8, detach_instance_head=True)
    for got, want in zip(b(x), a(x)):
        torch.testing.assert_close(got, want)


def test_a_plugin_without_instance_logits_is_refused_for_a_detached_head():
    class BagOnly(torch.nn.Module):
        def forward(self, features):
            return features.sum(1), features.sum()

    with pytest.raises(ConfigError, match="mil.instance_head"):
        Standardized(BagOnly(), 4, embed=4, detach_instance_head=True)
    assert isinstance(Standardized(MILAggregator(4), 4, detach_instance_head=True), Standardized)


def test_training_with_a_detached_instance_head_gives_the_bag_branch_of_the_bag_loss_alone(tmp_path):
    """The joint: fit_mil with `instance_head detached` and the product's losses trains the embedding, attention and
    bag classifier exactly as the bag BCE alone (w_ins 0, w_rank 0) does, its instance head differently; shared, the
    instance terms change the bag branch."""
    rng = np.random.default_rng(0)
    records = [SlideRecord(f"s{i:02d}", "", i % 2, "train" if i < 16 else "test") for i in range(20)]
    bags = {}
    for r in records:
        x = rng.normal(0, 1, (6, 5)).astype(np.float32)
        x[0, :2] += 2.5 * r.label
        bags[r.slide_id] = x
    store = array_store(tmp_path / "store", bags)
    base = dict(aggregator="abmil", embed=8, ensemble=1, epochs=3, workers=0, checkpoint_every=3)

    def trained(name: str, **knobs) -> dict[str, torch.Tensor]:
        result = fit_mil(MILConfig(**base, **knobs), store, records, tmp_path / name, seed=0)
        return load_aggregator(result.model_path)[0].state_dict()

    detached = trained("detached", instance_head="detached")
    bag_alone = trained("bag_alone", w_ins=0.0, w_rank=0.0)
    shared = trained("shared")
    bag_branch = [k for k in detached if "instance_classifier" not in k and k not in ("mean", "std")]
    assert any(k.startswith("embed.") for k in bag_branch)
    for key in bag_branch:
        torch.testing.assert_close(detached[key], bag_alone[key], msg=key)
    assert not torch.allclose(shared["embed.0.weight"], bag_alone["embed.0.weight"])
    head = "aggregator.instance_classifier.weight"
    assert not torch.allclose(detached[head], bag_alone[head])


def test_the_benchmark_pairs_the_two_heads_of_one_fit_and_counts_the_detached_wins():
    """benchmarks/instance_head.py's summary: detached - shared on the same run, round and MIL seed; a fit without its
    pair (a stopped run) is left out."""
    from benchmarks.instance_head import summarise

    def row(run, seed, mode, auc, inst):
        return {"run": run, "round": 0, "aggregator": "dsmil", "mil_seed": seed, "instance_head": mode,
                "test_auc": auc, "test_instance_auc": inst}

    rows = [row("a", 0, "shared", 0.70, 0.80), row("a", 0, "detached", 0.75, 0.78),
            row("b", 1, "shared", 0.80, 0.90), row("b", 1, "detached", 0.78, 0.95), row("c", 2, "shared", 0.1, 0.1)]
    entry = summarise(rows)["dsmil_round0"]
    assert entry["pairs"] == 2
    assert entry["test_auc_detached_minus_shared"]["mean"] == pytest.approx(0.015)
    assert entry["test_auc_shared"]["mean"] == pytest.approx(0.75)
    assert (entry["test_auc_detached_wins"], entry["test_instance_auc_detached_wins"]) == (1, 1)


def test_the_benchmark_pairs_each_aggregator_with_the_first_on_the_same_run_seed_and_head():
    """benchmarks/instance_head.py's aggregator comparison: the later aggregator minus the first on the same run, round,
    MIL seed and instance head; a fit without its pair is left out."""
    from benchmarks.instance_head import compare_aggregators

    def row(aggregator, run, mode, auc, inst):
        return {"run": run, "round": 0, "aggregator": aggregator, "mil_seed": 0, "instance_head": mode,
                "test_auc": auc, "test_instance_auc": inst}

    rows = [row("dsmil", "a", "shared", 0.70, 0.80), row("dsmil_its2clr", "a", "shared", 0.76, 0.70),
            row("dsmil", "b", "shared", 0.80, 0.90), row("dsmil_its2clr", "b", "shared", 0.78, 0.96),
            row("dsmil", "a", "detached", 0.1, 0.1), row("dsmil_its2clr", "c", "shared", 0.9, 0.9)]
    table = compare_aggregators(rows, ["dsmil", "dsmil_its2clr"])
    entry = table["dsmil_its2clr_minus_dsmil_round0_shared"]
    assert entry["pairs"] == 2
    assert entry["test_auc_minus_dsmil"]["mean"] == pytest.approx(0.02)
    assert entry["test_instance_auc_minus_dsmil"]["mean"] == pytest.approx(-0.02)
    assert (entry["test_auc_wins"], entry["test_instance_auc_wins"]) == (1, 1)
    assert table["dsmil_its2clr_minus_dsmil_round0_detached"]["pairs"] == 0


def test_the_benchmark_summarises_one_instance_head_without_pairs():
    """`--modes shared` alone: the table gives that head's mean over the fits instead of empty pairs (nan)."""
    from benchmarks.instance_head import summarise

    rows = [{"run": run, "round": 0, "aggregator": "dsmil", "mil_seed": 0, "instance_head": "shared",
             "test_auc": auc, "test_instance_auc": 0.9} for run, auc in (("a", 0.7), ("b", 0.8))]
    entry = summarise(rows)["dsmil_round0"]
    assert entry["test_auc_shared"]["mean"] == pytest.approx(0.75)
    assert "test_auc_detached" not in entry
