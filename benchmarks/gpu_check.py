"""The first checks on a GPU (issue 27): every GPU path of hnm-ray once, one JSON line per step.

    python benchmarks/gpu_check.py STEP --work DIR     # run by benchmarks/gpu_check.sh, one process per step
    python benchmarks/gpu_check.py probe --work DIR    # exit 0 when torch and cupy see a GPU, else 3

Steps: `versions` (torch / CUDA / cupy / cuCIM / driver, a DLPack round trip cupy -> torch -> cupy), `decode` (cuCIM
GPU vs CPU decode of a demo slide: pixel difference, no stale buffers, tiles/s at 1 and 4 workers, batch 64 and 256;
a batch mixing it with an NDPI copy read by OpenSlide),
`extract` (end-to-end extraction with resnet18_in on the GPU vs the CPU: tiles/s, sampled GPU utilisation, embedding
cosine; bf16 autocast too), `train` (MIL and fine-tuning with use_gpu for 2 epochs, then a forced resume: the
optimizer state must follow the parameters onto the GPU; then a 2-member mil.ensemble, its members Ray tasks asking for a
GPU each), `share` (two encoder actors on one GPU at 0.5 each).
Without a GPU a step prints {"step": ..., "status": "no GPU"} and exits 0 (gpu_check.sh probes once and prints those
lines itself: the dry run the test suite runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

STEPS: dict[str, Callable[[Path], dict[str, Any]]] = {}


def step(fn: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
    """Register a check under its function's name."""
    STEPS[fn.__name__] = fn
    return fn


def gpu_present() -> bool:
    """Whether torch and cupy both see a CUDA device (cuCIM's GPU decode needs cupy, the encoders need torch)."""
    import torch

    from hnm_ray.slides.reader import cuda_available

    return torch.cuda.is_available() and cuda_available()


def demo_cohort(work: Path, n_slides: int = 8, size: int = 4096) -> Path:
    """The demo cohort the steps share (made once in `work`)."""
    from hnm_ray.slides.synthetic import make_demo_cohort

    manifest = work / "cohort" / "manifest.csv"  # written last by make_demo_cohort: present = complete
    return manifest if manifest.is_file() else make_demo_cohort(manifest.parent, n_slides=n_slides, seed=0, size=size)


class GpuSampler:
    """GPU utilisation (%) sampled every 0.2 s with nvidia-smi while a block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           "-lms", "200"], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().split(",")[0].strip().isdigit():
                self.samples.append(float(line.split(",")[0]))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)

    def summary(self) -> dict[str, float | None]:
        """Mean and 90th percentile of the samples (None without nvidia-smi)."""
        s = np.asarray(self.samples)
        return {"gpu_util_mean": round(float(s.mean()), 1) if len(s) else None,
                "gpu_util_p90": round(float(np.percentile(s, 90)), 1) if len(s) else None,
                "gpu_util_samples": len(s)}


@step
def versions(work: Path) -> dict[str, Any]:
    """Versions of the GPU stack and a DLPack round trip cupy -> torch -> cupy (same memory, values kept)."""
    import cucim
    import cupy
    import torch

    driver = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    a = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    t = torch.from_dlpack(a)
    t.mul_(2)  # written through torch, read back through cupy: one buffer
    back = cupy.from_dlpack(t)
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "cupy": cupy.__version__, "cupy_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cupy_driver": cupy.cuda.runtime.driverGetVersion(), "cucim": cucim.__version__, "nvidia_smi": driver,
            "device": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported(),
            "dlpack_round_trip": bool(cupy.array_equal(back, cupy.arange(12, dtype=cupy.float32).reshape(3, 4) * 2))
            and t.data_ptr() == back.data.ptr}


@step
def decode(work: Path) -> dict[str, Any]:
    """cuCIM GPU vs CPU decode of one demo slide: max pixel difference, no stale buffers (each batch's GPU pixels
    match the CPU's of that batch, not the previous one's), tiles/s at 1 and 4 workers and batch 64 and 256."""
    import cupy

    from hnm_ray.slides.reader import open_slide
    from hnm_ray.store.manifest import load_manifest

    record = load_manifest(demo_cohort(work), require_labels=False)[0]
    size = 224
    with open_slide(record.path, device="cpu") as cpu, open_slide(record.path, device="cuda") as gpu:
        w, h = cpu.info.level_dimensions[0]
        grid = np.stack(np.meshgrid(np.arange(0, w - size, size), np.arange(0, h - size, size)), -1).reshape(-1, 2)
        locations = np.resize(grid, (512, 2)).astype(np.int64)
        diffs, stale = [], False
        for batch in (locations[:64], locations[64:128]):
            want = cpu.read_tiles(batch, size, 0, batch_size=64, num_workers=1)
            got = cupy.asnumpy(gpu.read_tiles(batch, size, 0, batch_size=64, num_workers=1))
            diffs.append(int(np.abs(got.astype(np.int16) - want.astype(np.int16)).max()))
            stale |= bool(len(diffs) > 1 and np.array_equal(got, previous) and not np.array_equal(want, previous))
            previous = want
        rates = {}
        for reader, name in ((cpu, "cpu"), (gpu, "gpu")):
            for workers in (1, 4):
                for batch_size in (64, 256):
                    reader.read_tiles(locations[:batch_size], size, 0, batch_size=batch_size, num_workers=workers)
                    started = time.perf_counter()
                    out = reader.read_tiles(locations, size, 0, batch_size=batch_size, num_workers=workers)
                    if name == "gpu":
                        cupy.cuda.Device().synchronize()
                    rates[f"{name}_w{workers}_b{batch_size}_tiles_s"] = round(len(out) / (time.perf_counter() - started), 1)
    return {"max_pixel_diff_per_batch": diffs, "stale_buffers": stale, **rates, "mixed_batch": _mixed_batch(record, work)}


def _mixed_batch(record: Any, work: Path) -> dict[str, Any]:
    """A GPU actor's batch of a cuCIM slide and an NDPI copy of it (OpenSlide, CPU decode): no errors, one device
    array, and the pixels a CPU actor reads."""
    import cupy

    from hnm_ray.config import TilingConfig
    from hnm_ray.extraction.decode import TileReaders, decode_batch
    from hnm_ray.extraction.index import tile_index

    ndpi = work / f"{record.slide_id}.ndpi"
    shutil.copy(record.path, ndpi)
    grid = tile_index(record, TilingConfig()).slice(0, 16).to_pydict()
    half = {k: np.asarray(v) for k, v in grid.items()}
    batch = {k: np.concatenate([v, v]) for k, v in half.items()}
    batch["path"] = np.asarray([record.path] * 16 + [str(ndpi)] * 16, dtype=object)
    tiles, errors = decode_batch(TileReaders(device="cuda"), batch, 224, 1)
    want, _ = decode_batch(TileReaders(device="cpu"), batch, 224, 1)
    return {"errors": sorted({e for e in errors if e}), "on_gpu": isinstance(tiles, cupy.ndarray),
            "max_pixel_diff": int(np.abs(cupy.asnumpy(tiles).astype(np.int16) - want.astype(np.int16)).max())}


def _extract(work: Path, name: str, changes: dict[str, Any], limit: int = 4) -> tuple[dict[str, Any], Any]:
    """One extraction of the first `limit` demo slides with resnet18_in into work/<name>; (summary, store)."""
    from hnm_ray.config import TrainConfig, from_tree, merge
    from hnm_ray.extract import extract_features
    from hnm_ray.models.encoders import config_tag
    from hnm_ray.store.features import FeatureStore
    from hnm_ray.store.manifest import load_manifest

    config = from_tree(TrainConfig, merge({"encoder": {"name": "resnet18_in"}, "extract": {"batch_size": 128}}, changes))
    records = load_manifest(demo_cohort(work), require_labels=False)[:limit]
    store = FeatureStore(work / name, config_tag(config.encoder))
    with GpuSampler() as sampler:
        summary = extract_features(records, store, config)
    return {"slides": summary.slides_written, "failed": summary.slides_failed, "tiles": summary.tiles_written,
            "tiles_s": round(summary.tiles_per_second, 1), **sampler.summary()}, store


def _cosine(a_store: Any, b_store: Any) -> dict[str, float]:
    """min / mean cosine between the embeddings of the same tiles in two stores."""
    cosines = []
    for slide_id in sorted(a_store.completed()):
        a, b = a_store.read_bag(slide_id).features, b_store.read_bag(slide_id).features
        cosines.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12))
    c = np.concatenate(cosines) if cosines else np.asarray([np.nan])
    return {"cosine_min": round(float(c.min()), 5), "cosine_mean": round(float(c.mean()), 5)}


@step
def extract(work: Path) -> dict[str, Any]:
    """End-to-end extraction with resnet18_in on the GPU (1 actor a GPU) and on the CPU, and bf16 autocast on the
    GPU: tiles/s, GPU utilisation, cosine of GPU (and bf16) embeddings to the CPU's."""
    from hnm_ray.run.cluster import init_ray

    init_ray()
    gpu, gpu_store = _extract(work, "gpu", {"extract": {"gpus_per_encoder": 1}})
    bf16, bf16_store = _extract(work, "bf16", {"extract": {"gpus_per_encoder": 1},
                                               "encoder": {"precision": "bfloat16"}})
    cpu, cpu_store = _extract(work, "cpu", {"extract": {"gpus_per_encoder": 0}}, limit=2)
    return {"gpu": gpu, "gpu_bf16": bf16, "cpu_2_slides": cpu, "gpu_vs_cpu": _cosine(cpu_store, gpu_store),
            "bf16_vs_cpu": _cosine(cpu_store, bf16_store)}


@step
def share(work: Path) -> dict[str, Any]:
    """Two encoder actors sharing one GPU (gpus_per_encoder 0.5): both run and the slides complete."""
    from hnm_ray.run.cluster import init_ray, live_nodes
    from hnm_ray.config import TrainConfig, from_tree
    from hnm_ray.extraction.encoder_pool import plan_encoder_pool

    init_ray()
    config = from_tree(TrainConfig, {"extract": {"gpus_per_encoder": 0.5}})
    pool = plan_encoder_pool(config.extract, True, live_nodes())
    result, _ = _extract(work, "share", {"extract": {"gpus_per_encoder": 0.5}})
    return {"pool": pool.describe(), **result}


@step
def train(work: Path) -> dict[str, Any]:
    """MIL (in process) and fine-tuning (a Ray Train GPU worker and in process) with use_gpu for 2 epochs, then a
    forced resume for one more epoch: a step after the resume runs and the optimizer state sits on the GPU."""
    import torch

    from hnm_ray.run.cluster import init_ray
    from hnm_ray.config import MILConfig, TrainConfig, from_tree
    from hnm_ray.extraction.index import tile_index
    from hnm_ray.models.encoders import config_tag
    from hnm_ray.store.features import FeatureStore
    from hnm_ray.store.manifest import load_manifest
    from hnm_ray.training.finetune import CHECKPOINT_FILE as FT_FILE, fit_finetune
    from hnm_ray.training.finetune_rows import TILE_ROW_SCHEMA
    from hnm_ray.training.mil import CHECKPOINT_FILE as MIL_FILE, fit_mil

    init_ray()
    manifest = demo_cohort(work)
    records = load_manifest(manifest)
    config = from_tree(TrainConfig, {"extract": {"gpus_per_encoder": 1}})
    store = FeatureStore(work / "train_store", config_tag(config.encoder))
    from hnm_ray.extract import extract_features

    extract_features(records, store, config)
    out: dict[str, Any] = {}

    def devices(path: Path, file_name: str) -> list[str]:
        state = torch.load(sorted(path.rglob(file_name))[-1], map_location=None, weights_only=True)
        return sorted({str(v.device) for s in state["optimizer"]["state"].values() for v in s.values()
                       if torch.is_tensor(v) and v.dim() > 0})

    mil = MILConfig(ensemble=1, workers=0, use_gpu=True, epochs=2, checkpoint_every=1)
    started = time.perf_counter()
    fit_mil(mil, store, records, work / "mil", name="mil", seed=0)
    resumed = fit_mil(dataclasses.replace(mil, epochs=3), store, records, work / "mil", name="mil", seed=0)
    out["mil"] = {"epochs": len(resumed.history), "seconds": round(time.perf_counter() - started, 1),
                  "val_auc": resumed.metrics.get("val_auc")}

    import pyarrow as pa

    grid = tile_index(records[0], config.tiling).slice(0, 128)
    n = grid.num_rows
    rows = pa.table({"slide_id": grid["slide_id"], "path": grid["path"], "tile_id": grid["tile_id"], "x": grid["x"],
                     "y": grid["y"], "level": grid["level"], "size": grid["size"],
                     "label": pa.array(np.arange(n) % 2, pa.int8()), "pos_rank": pa.array(np.zeros(n, np.float32)),
                     "kind": pa.array(np.arange(n) % 2, pa.int8())}, schema=TILE_ROW_SCHEMA)
    for workers in (1, 0):
        ft = from_tree(TrainConfig, {"finetune": {"use_gpu": True, "workers": workers, "batch_size": 32}})
        folder, started = work / f"ft{workers}", time.perf_counter()
        fit_finetune(ft, rows, None, folder, "ft", first_epoch=0, last_epoch=2, total_epochs=3)
        result = fit_finetune(ft, rows, None, folder, "ft", first_epoch=0, last_epoch=3, total_epochs=3)
        out[f"finetune_workers_{workers}"] = {"seconds": round(time.perf_counter() - started, 1),
                                              "last": result.history[-1], "optimizer_state_devices_saved":
                                              devices(folder / "ray_train", FT_FILE)}
    out["mil"]["optimizer_state_devices_saved"] = devices(work / "mil" / "ray_train", MIL_FILE)
    # mil.ensemble's members as Ray tasks asking for a GPU each (Ray is up, workers 0): one after another on one GPU
    started = time.perf_counter()
    ensemble = fit_mil(dataclasses.replace(mil, ensemble=2), store, records, work / "mil_ensemble", name="mil", seed=0)
    out["mil_ensemble_ray_tasks"] = {"members": 2, "seconds": round(time.perf_counter() - started, 1),
                                     "val_auc": ensemble.metrics.get("val_auc"), "optimizer_state_devices_saved":
                                     devices(work / "mil_ensemble" / "ray_train", MIL_FILE)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["probe", *STEPS], help="probe: exit 0 when a GPU is present, else 3")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder shared by the steps")
    args = parser.parse_args(argv)
    if args.step == "probe":
        return 0 if gpu_present() else 3
    args.work.mkdir(parents=True, exist_ok=True)
    line: dict[str, Any] = {"step": args.step}
    started = time.perf_counter()
    if not gpu_present():
        line["status"] = "no GPU"
    else:
        try:
            line.update(STEPS[args.step](args.work), status="ok")
        except Exception as exc:  # noqa: BLE001 - the check records what failed and goes on to the next step
            line.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
    line["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(line, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
