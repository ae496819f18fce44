"""Import speed of TRIDENT h5 feature files into the feature store, against a plain h5py read of the same files.

Writes `--slides` TRIDENT-layout files of `--tiles` x `--dim` float32 features (+ int64 coords) in a temp folder,
then in one run: reads every file's `features` and `coords` with h5py (the disk-speed baseline; the files are in
the page cache after writing, so both sides read warm), and imports them with `import_h5` (read, check, zstd
Parquet write). MB/s counts the h5 payload bytes (features + coords). Prints one JSON line.
Run: python benchmarks/import_h5.py > benchmarks/results/import_h5.json
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "h5"
        folder.mkdir()
        paths = write_files(folder, args.slides, args.tiles, args.dim)
        started = time.perf_counter()
        nbytes = plain_read(paths)
        plain_s = time.perf_counter() - started
        store = FeatureStore(Path(tmp) / "store", "bench")
        started = time.perf_counter()
        summary = import_h5(paths, store, "trident")
        import_s = time.perf_counter() - started
        assert len(summary.written) == args.slides, summary.failed
        parquet_bytes = sum(p.stat().st_size for p in store.files())
    mb = nbytes / 1e6
    print(json.dumps({"benchmark": "import_h5", "slides": args.slides, "tiles": args.tiles, "dim": args.dim,
                      "h5_payload_mb": round(mb, 1), "plain_h5py_read_mb_s": round(mb / plain_s, 1),
                      "import_mb_s": round(mb / import_s, 1), "import_vs_plain_read": round(plain_s / import_s, 3),
                      "parquet_mb": round(parquet_bytes / 1e6, 1),
                      "machine": {"arch": platform.machine(), "python": platform.python_version(),
                                  "h5py": h5py.__version__}}))


if __name__ == "__main__":
    main()
