"""The extraction encoder pool's size: how many encoder actors, and the CPUs, GPUs and torch threads of each, from
the live nodes' resources (`cluster.live_nodes()`) and the `extract` config section.

Unless `extract.num_encoders` is set the pool fills the cluster: per node as many actors as its GPUs (shares of
`gpus_per_encoder`), CPUs and, for CPU actors, memory hold. Some node always keeps READ_RESERVE CPUs free: the
tile-index read tasks feed the actors, and actors holding every CPU starve them (extraction then hangs). GPU actors
asked for while no GPU node is up (an autoscaling cluster whose GPU group starts at 0) make a pool that grows: it
starts with one actor, whose demand starts a GPU node, and Ray Data adds actors while batches wait, so the pool
follows the GPU nodes as they join (set `num_encoders` to ask for them all at once).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from hnm_ray.config import ExtractConfig

log = logging.getLogger("hnm_ray")

# What one slide's tile-index read task (hnm_ray.extraction.index_stream) asks for. Its work is a Parquet read
# (rounds >= 1) or one thumbnail's tissue detection (round 0): light next to the encoder actors it feeds. Asking for
# a decoder's half CPU made the stage need every CPU of a 2-core machine, so inside a sweep trial (whose driver holds
# 0.01 CPU) the read task never got scheduled and the stage waited forever.
INDEX_TASK_CPUS = 0.25
READ_RESERVE = 2 * INDEX_TASK_CPUS  # two read tasks at a time, and room for a sweep trial's 0.01-CPU driver
CPU_ENCODER_MEMORY = 2 * 1024**3  # bytes a CPU encoder actor may reach: ~0.7 GiB private with small_cnn
                                  # (results/extract.json), more with ResNets; caps the actors a node is given
EPS = 1e-9  # float floors: 1.0 / 0.1 is 9.999...


@dataclass(frozen=True)
class EncoderPool:
    """The encoder actors of one extraction and what each asks Ray for."""

    actors: int
    cpus: float  # per actor
    gpus: float  # per actor
    threads: int  # torch threads per actor
    grows: bool = False  # `actors` to start with; Ray Data adds more as nodes join (GPU nodes not up yet)

    def describe(self) -> str:
        """One log line's worth: '2 encoder actors (1 GPU + 1 CPU each, 1 torch thread)'."""
        each = f"{self.gpus:g} GPU + {self.cpus:g} CPU" if self.gpus else f"{self.cpus:g} CPU"
        count = f"{self.actors}+ (growing as GPU nodes join)" if self.grows else str(self.actors)
        return (f"{count} encoder actor{'s' * (self.actors > 1 or self.grows)} ({each} each, {self.threads} torch "
                f"thread{'s' * (self.threads > 1)})")

    def strategy(self, calls: int):
        """The Ray Data compute strategy of this pool, each actor running `calls` batches at once."""
        import ray

        size = {"min_size": self.actors, "max_size": None} if self.grows else {"size": self.actors}
        return ray.data.ActorPoolStrategy(**size, max_concurrent_calls_per_actor=calls,
                                          enable_true_multi_threading=calls > 1)


def plan_encoder_pool(extract: ExtractConfig, use_gpu: bool, nodes: list[dict[str, float]]) -> EncoderPool:
    """The pool for these live nodes (each a Ray resource dict: CPU, GPU, memory in bytes)."""
    cpus = actor_cpus(extract, use_gpu, [n.get("CPU", 0.0) for n in nodes])
    gpus = (extract.gpus_per_encoder if extract.gpus_per_encoder is not None else 1.0) if use_gpu else 0.0
    layout = None if extract.num_encoders else actors_per_node(extract, use_gpu, nodes, cpus)
    actors = extract.num_encoders or max(1, sum(layout))
    grows = use_gpu and not extract.num_encoders and not any(n.get("GPU", 0.0) > 0 for n in nodes)
    return EncoderPool(actors, cpus, gpus, torch_threads(extract, use_gpu, nodes, layout, actors), grows)


def actor_cpus(extract: ExtractConfig, use_gpu: bool, node_cpus: list[float]) -> float:
    """CPUs an encoder actor asks for: cpus_per_encoder (+ cpus_per_decoder on CPU actors, for the thread decoding
    its next batch), trimmed to the room of the largest node when that node holds cpus_per_encoder but not the
    whole ask (asking more than any node has would leave the actor pending for ever; on 1-CPU nodes the decoding
    thread shares the encoder's CPU). On a cluster with one CPU node the room leaves READ_RESERVE free. Nodes that do
    not exist yet (an autoscaling cluster's 0-CPU head alone) are not guessed at."""
    wanted = extract.cpus_per_encoder + (0.0 if use_gpu else extract.cpus_per_decoder)
    cpu_nodes = [c for c in node_cpus if c > 0]
    largest = max(cpu_nodes, default=0.0)
    room = largest - READ_RESERVE if len(cpu_nodes) == 1 else largest
    if extract.cpus_per_encoder <= largest and 0 < room < wanted:
        log.info("extract: encoder actors ask %.2f CPU, not %.2f: the largest node has %.2f", room, wanted, largest)
        return room
    return wanted


def actors_per_node(extract: ExtractConfig, use_gpu: bool, nodes: list[dict[str, float]], cpus: float) -> list[int]:
    """Encoder actors each node holds (by GPU shares, CPUs and, for CPU actors, memory), less actors until some
    node has READ_RESERVE CPUs free."""
    layout = []
    for node in nodes:
        fits = int(node.get("CPU", 0.0) / cpus + EPS)
        if use_gpu:
            share, gpus = extract.gpus_per_encoder or 1.0, node.get("GPU", 0.0)
            # fractional shares pack per physical GPU: 0.4 -> 2 actors a GPU, not 2.5 (a share is at most 1)
            fits = min(fits, int(gpus + EPS) * int(1 / share + EPS))
        elif "memory" in node:
            fits = min(fits, int(node["memory"] // CPU_ENCODER_MEMORY))
        layout.append(fits)

    def free(i: int) -> float:
        return nodes[i].get("CPU", 0.0) - layout[i] * cpus

    while sum(layout) > 1 and max(free(i) for i in range(len(nodes))) < READ_RESERVE - EPS:
        layout[max((i for i in range(len(nodes)) if layout[i]), key=lambda i: nodes[i].get("CPU", 0.0))] -= 1
    return layout


def torch_threads(extract: ExtractConfig, use_gpu: bool, nodes: list[dict[str, float]], layout: list[int] | None,
                  actors: int) -> int:
    """Torch threads of an encoder actor: cpus_per_encoder (at least 1), and for CPU actors at least the CPUs per
    actor of the most crowded node holding actors (one actor on a 2-CPU laptop: 2 threads, +25 % tiles/s over 1,
    instead of a core idle while it encodes). With a user-set actor count: a node's CPUs at most."""
    threads = int(max(1, extract.cpus_per_encoder))
    cpus = [n.get("CPU", 0.0) for n in nodes]
    if use_gpu or not cpus:
        return threads
    if layout is None or not any(layout):
        share = min(max(cpus), sum(cpus) / actors)
    else:
        share = min(c / a for c, a in zip(cpus, layout) if a)
    return max(threads, int(share + EPS))
