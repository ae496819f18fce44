"""Reading tiles: open slides once per actor or worker, batched cuCIM reads, checked tiles.

Used by extraction (each encoder actor decodes its batches of tile coordinates, `extract.TileEncoder`) and by
fine-tuning (each Train worker decodes the tiles of its share, `training/tile_batches.py`). Rows of a batch may
come from several slides; a failed read marks that slide's rows with an error string and zero pixels so the
consumer can skip the slide without losing the batch.
"""
from __future__ import annotations

import logging
import resource
from collections import OrderedDict
from typing import Any

import numpy as np

from hnm_ray.core.errors import SlideError
from hnm_ray.slides.integrity import FIX_CORRUPT_TILE, TileIntegrity, tile_integrity

log = logging.getLogger("hnm_ray")


# Files an open slide reader may hold: the reader's own and its tile-integrity check's (2 measured), one to spare.
FILES_PER_READER = 3
FILES_KEPT_FREE = 256  # for everything else the process opens (Ray, the store, checkpoints)


def readers_within_file_limit() -> int:
    """How many slide readers this process can keep open under its soft open-file limit (at least 4)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(4, (soft - FILES_KEPT_FREE) // FILES_PER_READER)


class TileReaders:
    """An LRU of open slide readers (a CuImage cannot be pickled: each actor opens its own), closed on close()."""

    def __init__(self, device: str = "cpu", capacity: int = 4) -> None:
        self.device = device
        self.capacity = capacity
        self._open: OrderedDict[str, Any] = OrderedDict()
        self._checks: dict[str, TileIntegrity | None] = {}

    def get(self, path: str, slide_id: str) -> Any:
        """The open reader of `path`, opening it (and closing the least recently used) when needed."""
        from hnm_ray.slides.reader import choose_backend, open_slide

        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        device = self.device
        if device == "cuda" and (backend := choose_backend(path)) != "cucim":
            # NDPI, MRXS, ...: OpenSlide decodes on the CPU; the tiles go to the GPU with the batch (`decode_batch`)
            log.info("slide %r: read by %s on the CPU (cuCIM's GPU decode does not read its format)", slide_id, backend)
            device = "cpu"
        reader = open_slide(path, slide_id=slide_id, device=device)
        self._open[path] = reader
        self._checks[path] = tile_integrity(reader)
        if len(self._open) > self.capacity:
            self._close(next(iter(self._open)))  # the least recently used
        return reader

    def _close(self, path: str) -> None:
        """Close the reader of `path` and its tile check."""
        self._open.pop(path).close()
        if (check := self._checks.pop(path, None)) is not None:
            check.close()

    def close(self) -> None:
        """Close every open reader and its tile check (their files stay open until then, even unreferenced)."""
        for path in list(self._open):
            self._close(path)

    def __enter__(self) -> TileReaders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, path: str, locations: np.ndarray, size: int, level: int) -> None:
        """Raise SlideError when a JPEG tile under these reads of the open slide `path` is corrupt."""
        check, reader = self._checks.get(path), self._open.get(path)
        if check is None or reader is None:
            return
        if reason := check.problem(locations, size, level, reader.info.level_downsamples[level]):
            raise SlideError(reader.slide_id, reason, FIX_CORRUPT_TILE)


def decode_batch(readers: TileReaders, batch: dict[str, np.ndarray], tile_size: int, num_workers: int) -> tuple[Any, np.ndarray]:
    """Decode a batch of tile rows (any mix of slides) -> (tiles (B,S,S,3) uint8, per-row error strings); rows that
    arrive with an `error` keep it and are not read."""
    n = len(batch["tile_id"])
    tiles = None
    errors = np.array(batch["error"], dtype=object) if "error" in batch else np.full(n, "", dtype=object)
    paths = batch["path"]
    starts = np.flatnonzero(np.r_[True, paths[1:] != paths[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], n]):
        rows = slice(start, stop)
        if errors[start]:  # the slide failed upstream (its tile index): nothing to read
            continue
        slide_id = str(batch["slide_id"][start])
        try:
            reader = readers.get(str(paths[start]), slide_id)
            locations = np.stack([batch["x"][rows], batch["y"][rows]], axis=1).astype(np.int64)
            readers.check(str(paths[start]), locations, int(batch["size"][start]), int(batch["level"][start]))
            part = reader.read_tiles(locations, int(batch["size"][start]), int(batch["level"][start]),
                                     batch_size=stop - start, num_workers=num_workers)
            part = _resize(part, tile_size)
        except Exception as exc:  # noqa: BLE001 - recorded per slide by the driver
            errors[rows] = str(exc) if isinstance(exc, SlideError) else f"slide {slide_id!r}: tile read failed: {exc}"
            continue
        if tiles is None:
            tiles = _zeros_like(part, n, tile_size)
        elif isinstance(tiles, np.ndarray) != isinstance(part, np.ndarray):  # CPU-decoded slide beside GPU ones
            tiles, part = _on_gpu(tiles), _on_gpu(part)
        tiles[rows] = part
    if tiles is None:
        tiles = np.zeros((n, tile_size, tile_size, 3), np.uint8)
    return tiles, errors


def _zeros_like(part: Any, n: int, tile_size: int) -> Any:
    xp = np if isinstance(part, np.ndarray) else __import__("cupy")
    return xp.zeros((n, tile_size, tile_size, 3), dtype=xp.uint8)


def _on_gpu(array: Any) -> Any:
    """`array` on the GPU (cupy): numpy arrays are copied there."""
    return __import__("cupy").asarray(array) if isinstance(array, np.ndarray) else array


def _resize(tiles: Any, tile_size: int) -> Any:
    """Resize (B,H,W,3) uint8 tiles to tile_size when read at another size (mpp-based tiling)."""
    if tiles.shape[1] == tile_size and tiles.shape[2] == tile_size:
        return tiles
    import torch

    t = torch.from_dlpack(tiles) if not isinstance(tiles, np.ndarray) else torch.from_numpy(np.ascontiguousarray(tiles))
    t = torch.nn.functional.interpolate(t.permute(0, 3, 1, 2).float(), size=(tile_size, tile_size), mode="bilinear",
                                        antialias=True, align_corners=False)
    out = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return out.numpy() if isinstance(tiles, np.ndarray) else __import__("cupy").from_dlpack(out)
