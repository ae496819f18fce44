"""The extraction encoder pool's size from the live nodes: actors, CPUs, GPUs and torch threads of each, and the
CPUs some node keeps free for the tile-index read tasks that feed the actors (without them extraction hangs)."""
from __future__ import annotations

import dataclasses

import pytest
from _support import small_config

from hnm_ray.extraction.encoder_pool import READ_RESERVE, actor_cpus, actors_per_node, plan_encoder_pool

GIB = 1024**3


def _extract(**changes):
    return dataclasses.replace(small_config().extract, **changes)


@pytest.mark.parametrize("nodes,want", [([2.0], 1.5), ([1.0, 1.0, 1.0], 1.0), ([0.0, 4.0], 1.5), ([0.0], 1.5),
                                        ([], 1.5), ([0.5], 1.5), ([1.0], 0.5), ([1.4], 0.9), ([0.0, 1.0], 0.5)])
def test_cpu_actor_asks_its_share_trimmed_to_the_room_of_the_largest_node(nodes, want):
    """A CPU encoder actor asks cpus_per_encoder + cpus_per_decoder (1 + 0.5), trimmed to a node that holds the
    encoder's share but not the sum (never more than any node has: the actor would wait for ever; with one CPU node,
    0-CPU head or not, never its last READ_RESERVE CPUs: the read tasks feed it); with no node that holds the
    encoder's share (an autoscaling cluster's head) it asks the sum."""
    assert actor_cpus(small_config().extract, False, nodes) == pytest.approx(want)


def test_gpu_actor_asks_cpus_per_encoder_and_leaves_the_read_tasks_room():
    assert actor_cpus(small_config().extract, True, [16.0]) == 1.0
    assert actor_cpus(small_config().extract, True, [1.0]) == pytest.approx(1.0 - READ_RESERVE)
    assert actor_cpus(_extract(cpus_per_encoder=12.0), False, [0.0, 12.0]) == pytest.approx(12.0 - READ_RESERVE)


@pytest.mark.parametrize("nodes,use_gpu,want", [
    ([{"CPU": 2.0, "memory": 16 * GIB}], False, 1),                      # this laptop: one 1.5-CPU actor
    ([{"CPU": 8.0, "memory": 16 * GIB}], False, 5),                      # 5 x 1.5 CPU, 0.5 left for index reads
    ([{"CPU": 9.0, "memory": 16 * GIB}], False, 5),                      # 6 x 1.5 would leave no CPU to read with
    ([{"CPU": 64.0, "memory": 12 * GIB}], False, 6),                     # memory caps it (2 GiB an actor)
    ([{"CPU": 8.0}, {"CPU": 8.0}], False, 10),                           # per node, summed
    ([{"CPU": 1.0}] * 4, False, 3),                                      # 1-CPU nodes: 1.0-CPU actors, one node reads
    ([{"CPU": 0.0}, {"CPU": 1.0}], False, 1),                            # 0-CPU head + 1 CPU: a 0.5-CPU actor
    ([{"CPU": 0.0}], False, 1),                                          # nothing fits (yet): still one actor
    ([{"CPU": 16.0, "GPU": 8.0, "memory": 64 * GIB}], True, 8),          # one actor per GPU
    ([{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}], True, 8),
    ([{"CPU": 4.0, "GPU": 8.0}], True, 3),                               # 1 CPU each: 4 would starve the reads
    ([{"CPU": 4.0, "GPU": 8.0}, {"CPU": 64.0}], True, 4),                # a GPU node's CPUs cap it; reads elsewhere
])
def test_pool_fills_the_cluster_by_default(nodes, use_gpu, want):
    """Without --extract.num_encoders the pool is as large as the cluster holds: per node an actor per GPU share,
    or as many as its CPUs and memory hold, with READ_RESERVE CPUs free on some node."""
    assert plan_encoder_pool(small_config().extract, use_gpu, nodes).actors == want


def test_free_cpus_for_reads_are_checked_per_node_not_in_total():
    """Two 5-CPU nodes of 1.2-CPU actors: 4 each leave 0.2 + 0.2 CPU, too little on either node for a read task."""
    extract = _extract(cpus_per_decoder=0.2)
    layout = actors_per_node(extract, False, [{"CPU": 5.0}, {"CPU": 5.0}], actor_cpus(extract, False, [5.0, 5.0]))
    assert sorted(layout) == [3, 4]


def test_fractional_gpu_shares_pack_per_physical_gpu():
    assert plan_encoder_pool(_extract(gpus_per_encoder=0.4), True, [{"CPU": 64.0, "GPU": 8.0}]).actors == 16
    assert plan_encoder_pool(_extract(gpus_per_encoder=0.1), True, [{"CPU": 64.0, "GPU": 1.0}]).actors == 10


def test_gpu_pool_grows_when_no_gpu_node_is_up_yet():
    """An autoscaling cluster whose GPU group starts at 0 pods (cluster/kuberay/rayjob-tune.yaml): GPU actors asked for
    (`gpus_per_encoder 1`) without `num_encoders` start at 1 and grow as GPU nodes join (was: a fixed pool of 1)."""
    pool = plan_encoder_pool(_extract(gpus_per_encoder=1.0), True, [{"CPU": 0.0}])
    strategy = pool.strategy(2)
    assert pool.grows and (strategy.min_size, strategy.max_size) == (1, float("inf"))
    assert strategy.max_concurrent_calls_per_actor == 2 and "growing" in pool.describe()
    up = plan_encoder_pool(_extract(gpus_per_encoder=1.0), True, [{"CPU": 0.0}, {"CPU": 12.0, "GPU": 1.0}] * 2)
    assert not up.grows and (up.strategy(2).min_size, up.strategy(2).max_size) == (2, 2)  # GPUs up: fixed pool
    asked = plan_encoder_pool(_extract(gpus_per_encoder=1.0, num_encoders=4), True, [{"CPU": 0.0}])
    assert not asked.grows and asked.actors == 4  # the user's count: asked for at once
    assert not plan_encoder_pool(_extract(), False, [{"CPU": 0.0}]).grows


def test_more_than_one_gpu_per_encoder_is_refused():
    """An encoder actor encodes on one GPU: `gpus_per_encoder 2` would hold a second GPU it never uses."""
    from hnm_ray import config as cfg
    from hnm_ray.config import TrainConfig
    from hnm_ray.core.errors import ConfigError

    with pytest.raises(ConfigError, match="extract.gpus_per_encoder"):
        cfg.from_tree(TrainConfig, {"extract": {"gpus_per_encoder": 2}})


def test_pool_is_the_users_when_given():
    assert plan_encoder_pool(_extract(num_encoders=3), False, [{"CPU": 64.0}]).actors == 3
    half = plan_encoder_pool(_extract(gpus_per_encoder=0.5), True, [{"CPU": 16.0, "GPU": 2.0}])
    assert (half.actors, half.gpus, half.cpus) == (4, 0.5, 1.0)


@pytest.mark.parametrize("nodes,num_encoders,use_gpu,want", [
    ([{"CPU": 2.0}], None, False, 2),                  # this laptop: one actor encodes on both cores
    ([{"CPU": 8.0}], None, False, 1),                  # as many actors as fit: one thread each
    ([{"CPU": 64.0, "memory": 12 * GIB}], None, False, 10),  # memory-capped actors share the CPUs
    ([{"CPU": 64.0}, {"CPU": 2.0}], None, False, 1),   # the most crowded node decides, not the cluster's average
    ([{"CPU": 16.0}] * 4, 1, False, 16),               # one user-set actor: a node's CPUs at most
    ([{"CPU": 16.0, "GPU": 8.0}], None, True, 1),      # a GPU actor: cpus_per_encoder
])
def test_torch_threads_share_the_cpus_of_the_node(nodes, num_encoders, use_gpu, want):
    assert plan_encoder_pool(_extract(num_encoders=num_encoders), use_gpu, nodes).threads == want
    more = plan_encoder_pool(_extract(num_encoders=num_encoders, cpus_per_encoder=12.0), use_gpu, nodes)
    assert more.threads >= 12


def test_describe_names_the_pool():
    pool = plan_encoder_pool(small_config().extract, False, [{"CPU": 2.0}])
    assert pool.describe() == "1 encoder actor (1.5 CPU each, 2 torch threads)"
