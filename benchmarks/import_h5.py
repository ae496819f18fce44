"""Import speed of TRIDENT h5 feature files into the feature store, against a plain h5py read of the same files and
the disk's write speed.

Writes `--slides` TRIDENT-layout files of `--tiles` x `--dim` float32 features (+ int64 coords) in a temp folder,
then in one run: reads every file's `features` and `coords` with h5py (the read baseline; the files are in the page
cache after writing, so both sides read warm), writes the same payload bytes as plain files, each fsynced (the
disk's write speed: the bound an import that writes every byte once can reach), and imports them with `import_h5`
(read, check, Parquet write + fsync). MB/s counts the h5 payload bytes (features + coords). Prints one JSON line
with the 1-min load average (the machine is shared). The issue's size (1,000 files: 41 GB of h5 and as much
Parquet) does not fit this machine's disk beside the rest; --slides scales it.
Run: python benchmarks/import_h5.py > benchmarks/results/import_h5.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa

from hnm_ray.import_features import import_h5
from hnm_ray.store.features import FeatureStore


def write_files(folder: Path, slides: int, tiles: int, dim: int) -> list[Path]:
    """TRIDENT-layout files of random float32 features on a level-0 grid of 256 px tiles."""
    rng = np.random.default_rng(0)
    grid = np.arange(tiles)
    coords = np.stack([grid % 100, grid // 100], axis=1).astype(np.int64) * 256
    paths = []
    for i in range(slides):
        path = folder / f"slide_{i:04d}.h5"
        with h5py.File(path, "w") as h5:
            h5["features"] = rng.normal(size=(tiles, dim)).astype(np.float32)
            h5["coords"] = coords
            h5["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 256, "level0_magnification": 20})
        paths.append(path)
    return paths


def plain_read(paths: list[Path]) -> int:
    """Bytes of `features` + `coords` read with h5py, file by file."""
    total = 0
    for path in paths:
        with h5py.File(path, "r") as h5:
            total += h5["features"][()].nbytes + h5["coords"][()].nbytes
    return total


def plain_write(paths: list[Path], folder: Path) -> tuple[int, float]:
    """(bytes, seconds) of writing one file's `features` + `coords` payload once per file of `paths` as a plain file
    in `folder`, each fsynced (the files are the same size; the one h5 read is not timed)."""
    with h5py.File(paths[0], "r") as h5:
        payload = h5["features"][()].tobytes() + h5["coords"][()].tobytes()
    started, total = time.perf_counter(), 0
    for path in paths:
        with open(folder / f"{path.stem}.bin", "wb") as sink:
            total += sink.write(payload)
            sink.flush()
            os.fsync(sink.fileno())
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=48)
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, plain = Path(tmp) / "h5", Path(tmp) / "plain"
        folder.mkdir()
        plain.mkdir()
        paths = write_files(folder, args.slides, args.tiles, args.dim)
        os.sync()  # the h5 files' dirty pages on disk first: no write-back of them competes with the timed writes
        started = time.perf_counter()
        nbytes = plain_read(paths)
        read_s = time.perf_counter() - started
        written, write_s = plain_write(paths, plain)
        assert written == nbytes
        shutil.rmtree(plain)  # room on the disk for the store
        os.sync()
        store = FeatureStore(Path(tmp) / "store", "bench")
        load = os.getloadavg()[0]
        started = time.perf_counter()
        summary = import_h5(paths, store, "trident")
        import_s = time.perf_counter() - started
        assert len(summary.written) == args.slides, summary.failed
        parquet_bytes = sum(p.stat().st_size for p in store.files())
    mb = nbytes / 1e6
    print(json.dumps({"benchmark": "import_h5", "slides": args.slides, "tiles": args.tiles, "dim": args.dim,
                      "h5_payload_mb": round(mb, 1), "plain_h5py_read_mb_s": round(mb / read_s, 1),
                      "plain_write_fsync_mb_s": round(mb / write_s, 1), "import_mb_s": round(mb / import_s, 1),
                      "import_vs_plain_read": round(read_s / import_s, 3),
                      "import_vs_plain_write": round(write_s / import_s, 3),
                      "parquet_mb": round(parquet_bytes / 1e6, 1), "load_avg_1min": round(load, 2),
                      "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                                  "python": platform.python_version(), "h5py": h5py.__version__,
                                  "pyarrow": pa.__version__}}))


if __name__ == "__main__":
    main()
