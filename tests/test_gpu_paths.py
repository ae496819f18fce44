"""GPU code paths checked on the CPU (issue 27): what a GPU worker or actor does, with stand-ins where a GPU is needed.

A move to float64 stands in for `.to("cuda")`: torch casts optimizer state to its parameters' dtype AND device at
the same point (`Optimizer.load_state_dict`), so state left behind by the float64 move would be left on the CPU
by the move to a GPU.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from _support import small_config

from hnm_ray.config import MILConfig, TilingConfig
from hnm_ray.store.manifest import load_manifest
from hnm_ray.training import runner


def _floats(value, dtype):
    """`value` (a tensor or a tuple of them) with its floating tensors cast to `dtype`."""
    if isinstance(value, tuple):
        return tuple(_floats(v, dtype) for v in value)
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def wrap_as_float64(model, world: int, device: str):
    """`runner.wrap_model` with float64 as the other device: parameters move, inputs and outputs are cast."""
    model.to(torch.float64)
    model.register_forward_pre_hook(lambda module, args: _floats(args, torch.float64))
    model.register_forward_hook(lambda module, args, out: _floats(out, torch.float32))
    return model


def optimizer_state_dtypes(state: dict) -> set[torch.dtype]:
    """Dtypes of the floating tensors in a saved optimizer state (momentum buffers, Adam moments)."""
    return {v.dtype for per_param in state["optimizer"]["state"].values() for v in per_param.values()
            if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0}


def newest_state(driver_checkpoints: Path, file_name: str) -> dict:
    newest = sorted(driver_checkpoints.glob(f"epoch_*/{file_name}"))[-1]
    return torch.load(newest, map_location="cpu", weights_only=True)


def test_place_and_restore_loads_optimizer_state_onto_the_parameters_device():
    def make(state=None):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        return runner.place_and_restore(model, 1, torch.float64, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                        lambda o: torch.optim.lr_scheduler.StepLR(o, 1), state)

    model, optimizer, scheduler = make()
    model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    model, optimizer, _ = make(state)
    assert {b.dtype for b in (s["momentum_buffer"] for s in optimizer.state.values())} == {torch.float64}
    model(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()  # a step after the restore works on the moved state


@pytest.mark.timeout(300)
def test_mil_resume_keeps_optimizer_state_on_the_parameters_device(mil_store, mil_cohort, tmp_path, monkeypatch):
    from hnm_ray.training.mil import CHECKPOINT_FILE, fit_mil

    records = load_manifest(mil_cohort)
    config = MILConfig(ensemble=1, workers=0, epochs=1, checkpoint_every=1)
    fit_mil(config, mil_store, records, tmp_path, name="m", seed=0)
    monkeypatch.setattr(runner, "wrap_model", wrap_as_float64)
    fit_mil(replace(config, epochs=2), mil_store, records, tmp_path, name="m", seed=0)  # resumes at epoch 1
    state = newest_state(tmp_path / "ray_train" / "m" / "driver_checkpoints", CHECKPOINT_FILE)
    assert state["epoch"] == 1 and {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float64}
    assert optimizer_state_dtypes(state) == {torch.float64}


@pytest.fixture(scope="module")
def finetune_rows(demo_cohort) -> pa.Table:
    """16 tiles of one demo slide as fine-tuning rows."""
    from hnm_ray.extraction.index import tile_index
    from hnm_ray.training.finetune_rows import TILE_ROW_SCHEMA

    grid = tile_index(load_manifest(demo_cohort, require_labels=False)[0], TilingConfig(tile_size=64)).slice(0, 16)
    n = grid.num_rows
    return pa.table({"slide_id": grid["slide_id"], "path": grid["path"], "tile_id": grid["tile_id"],
                     "x": grid["x"], "y": grid["y"], "level": grid["level"], "size": grid["size"],
                     "label": pa.array(np.arange(n) % 2, pa.int8()), "pos_rank": pa.array(np.zeros(n, np.float32)),
                     "kind": pa.array(np.arange(n) % 2, pa.int8()), "score": pa.array(np.zeros(n, np.float32)),
                     "supcon_class": pa.array(np.arange(n) % 2, pa.int16())}, schema=TILE_ROW_SCHEMA)


@pytest.mark.timeout(300)
def test_finetune_resume_keeps_optimizer_state_on_the_parameters_device(finetune_rows, tmp_path, monkeypatch):
    from hnm_ray.training.finetune import CHECKPOINT_FILE, fit_finetune

    # momentum 0.9: SGD keeps a momentum buffer per parameter (with the default 0 it keeps no state to check)
    config = small_config({"tiling": {"tile_size": 64}, "finetune": {"workers": 0, "batch_size": 8,
                                                                     "cpus_per_worker": 1, "momentum": 0.9}})
    fit_finetune(config, finetune_rows, None, tmp_path, "ft", first_epoch=0, last_epoch=1, total_epochs=2)
    monkeypatch.setattr(runner, "wrap_model", wrap_as_float64)
    fit_finetune(config, finetune_rows, None, tmp_path, "ft", first_epoch=0, last_epoch=2, total_epochs=2)
    state = newest_state(tmp_path / "ray_train" / "ft" / "driver_checkpoints", CHECKPOINT_FILE)
    assert state["epoch"] == 1 and {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float64}
    assert optimizer_state_dtypes(state) == {torch.float64}


# -- a GPU actor: OpenSlide-only formats fall back to CPU decode; no GPU for torch is refused ---------------------

def test_gpu_readers_decode_openslide_only_formats_on_the_cpu(demo_cohort, tmp_path):
    """An NDPI/MRXS slide in a GPU encoder actor (TileReaders(device="cuda")) is read by OpenSlide on the CPU, with
    the pixels a CPU actor reads, instead of failing as "'cuda' needs the cucim backend"."""
    import shutil

    from hnm_ray.extraction.decode import TileReaders, decode_batch
    from hnm_ray.extraction.index import tile_index

    record = load_manifest(demo_cohort, require_labels=False)[0]
    ndpi = tmp_path / f"{record.slide_id}.ndpi"  # a tiled TIFF: OpenSlide opens it (generic-tiff) by content
    shutil.copy(record.path, ndpi)
    grid = tile_index(record, TilingConfig(tile_size=64)).slice(0, 8).to_pydict()
    batch = {k: np.asarray(v) for k, v in grid.items()}
    batch["path"] = np.asarray([str(ndpi)] * len(batch["tile_id"]), dtype=object)
    tiles, errors = decode_batch(TileReaders(device="cuda"), batch, 64, 1)
    assert not any(errors), errors[0]
    on_cpu, _ = decode_batch(TileReaders(device="cpu"), batch, 64, 1)
    np.testing.assert_array_equal(tiles, on_cpu)
    assert tiles.std() > 0


def test_gpu_encoder_actor_without_a_gpu_for_torch_refuses():
    """An encoder actor given a GPU by Ray where torch sees none (a CPU torch wheel, a driver mismatch) refuses,
    instead of holding its GPU and encoding on one CPU thread."""
    from hnm_ray.config import EncoderConfig
    from hnm_ray.core.errors import ConfigError
    from hnm_ray.extract import TileEncoder

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    with pytest.raises(ConfigError, match="extract.gpus_per_encoder.*sees none"):
        TileEncoder(EncoderConfig(), 0, use_gpu=True, torch_threads=1, tile_size=32, decode_workers=1)
    assert TileEncoder(EncoderConfig(), 0, use_gpu=False, torch_threads=1, tile_size=32, decode_workers=1).device == "cpu"


@pytest.mark.timeout(300)
def test_mil_on_gpu_in_the_driver_without_a_gpu_refuses(mil_store, mil_cohort, tmp_path):
    """`--mil.use_gpu` with `mil.workers 0` on a GPU-less head: a clear error naming the knob, not a CUDA trace."""
    from hnm_ray.core.errors import ConfigError
    from hnm_ray.training.mil import fit_mil

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    with pytest.raises(ConfigError, match="mil.use_gpu"):
        fit_mil(MILConfig(ensemble=1, workers=0, epochs=1, use_gpu=True), mil_store, load_manifest(mil_cohort), tmp_path, seed=0)


# -- fine-tuning workers on GPU nodes ------------------------------------------------------------------------------

MIXED_CLUSTER = [{"CPU": 4.0}, {"CPU": 64.0}, {"CPU": 12.0, "GPU": 1.0}, {"CPU": 24.0, "GPU": 2.0}]


def test_gpu_fine_tuning_workers_are_sized_from_the_gpu_nodes(finetune_rows, tmp_path, monkeypatch):
    """A head, a 64-CPU CPU node and two GPU nodes: one worker per GPU, each asking for a GPU node's CPUs per GPU
    (12), not the largest node's 64 (a worker no node can hold never schedules)."""
    from hnm_ray.run import cluster
    from hnm_ray.training.finetune import fit_finetune, worker_cpus

    monkeypatch.setattr(cluster, "live_nodes", lambda: MIXED_CLUSTER)
    monkeypatch.setattr(cluster, "cluster_gpus", lambda: 3.0)
    asked = {}

    class Asked(Exception):
        """What fit_finetune would ask Ray Train for is all this test needs."""

    def capture(train_loop, loop, **kwargs):
        asked.update(kwargs)
        raise Asked

    monkeypatch.setattr(runner, "run_loop", capture)
    config = small_config({"finetune": {"use_gpu": True}})
    with pytest.raises(Asked):
        fit_finetune(config, finetune_rows, None, tmp_path, "ft", first_epoch=0, last_epoch=1, total_epochs=1)
    assert (asked["workers"], asked["cpus_per_worker"], asked["use_gpu"]) == (3, 12.0, True)
    assert worker_cpus(None, 1) == 64.0  # CPU workers: as before, at most the largest node
    monkeypatch.setattr(cluster, "live_nodes", lambda: MIXED_CLUSTER[:2])  # GPU group not started yet
    assert worker_cpus(None, 1, use_gpu=True) == 1.0


# -- AMP (encoder.precision bfloat16): the same code path as on a GPU, with autocast on the CPU --------------------

def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bfloat16_encoding_runs_the_encoder_in_bfloat16_and_stores_float32_close_to_float32():
    from hnm_ray.config import EncoderConfig
    from hnm_ray.extract import TileEncoder
    from hnm_ray.models.encoders import config_tag

    tiles = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    embeddings, seen = {}, []
    for precision in ("float32", "bfloat16"):
        actor = TileEncoder(EncoderConfig(precision=precision), 0, use_gpu=False, torch_threads=1, tile_size=32,
                            decode_workers=1)
        first_conv = next(m for m in actor.model.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        embeddings[precision] = actor.embed(tiles)
    assert seen == [torch.float32, torch.bfloat16]
    assert embeddings["bfloat16"].dtype == np.float32
    assert not np.array_equal(embeddings["float32"], embeddings["bfloat16"])
    assert _cosines(embeddings["float32"], embeddings["bfloat16"]).min() > 0.99
    assert config_tag(EncoderConfig(precision="bfloat16")) != config_tag(EncoderConfig())  # stores never mix


def test_bfloat16_fine_tuning_forward_returns_float32_and_trains_float32_weights():
    from hnm_ray.training.losses import supcon_loss
    from hnm_ray.models.encoders import small_cnn
    from hnm_ray.training.contrastive import contrastive_model, projection_head

    torch.manual_seed(0)
    encoder = small_cnn()
    model = contrastive_model(encoder, projection_head(encoder.out_dim, 8), "bfloat16")
    inner = []
    encoder.register_forward_hook(lambda module, args, out: inner.append(out.dtype))
    x = torch.randn(4, 3, 32, 32)
    z1, z2 = model(x), model(x.flip(3))
    assert inner == [torch.bfloat16] * 2 and z1.dtype == torch.float32
    supcon_loss(z1, z2, None, 0.1).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
