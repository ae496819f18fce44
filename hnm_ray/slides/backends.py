"""The slide reader's backends behind one API (`batches`, `read_level`, `close`, level dimensions, downsamples,
mpp): cuCIM `CuImage` (batched, multi-threaded reads), tifffile (decodes only the tiles a region needs) and
OpenSlide; `SlideReader` (reader.py) picks one."""
from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_UM_PER_UNIT = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "millimeter": 1e3, "mm": 1e3,
                "centimeter": 1e4, "cm": 1e4, "nanometer": 1e-3, "nm": 1e-3}


def _aperio_mpp(description: str) -> float | None:
    """MPP from an Aperio ImageDescription (`...|MPP = 0.4990|...`)."""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description or "")
    return float(match.group(1)) if match else None


class _Cucim:
    """cuCIM CuImage backend (batched, multi-threaded `read_region`)."""

    def __init__(self, path: str, device: str) -> None:
        from cucim import CuImage

        self.image = CuImage(path)
        self.device = device
        resolutions = self.image.resolutions
        self.dimensions = tuple(tuple(int(v) for v in d) for d in resolutions["level_dimensions"])
        self.downsamples = tuple(float(d) for d in resolutions["level_downsamples"])
        self.mpp = self._mpp()

    def _mpp(self) -> float | None:
        mpp = self.image.metadata.get("aperio", {}).get("MPP")
        if mpp:
            return float(mpp)
        scale = _UM_PER_UNIT.get(str(self.image.spacing_units()[1]).lower())
        return None if scale is None else float(self.image.spacing()[1]) * scale

    def batches(self, locations: np.ndarray, size: int, level: int, batch_size: int, num_workers: int) -> Iterator[Any]:
        # cuCIM wants a Python list (it rejects int64 numpy arrays) and at least one worker for several locations.
        # Each yielded array lives in a buffer the iterator reuses: callers copy it before the next step.
        iterator = self.image.read_region(locations.tolist(), (size, size), level, batch_size=batch_size,
                                          num_workers=max(1, num_workers), device=self.device)
        for batch in iterator:
            array = _array(batch, self.device)
            yield (array[None] if array.ndim == 3 else array)[..., :3]  # batch_size 1 yields (H, W, C); RGBA slow path

    def read_level(self, level: int) -> np.ndarray:
        return np.array(self.image.read_region((0, 0), self.dimensions[level], level))[..., :3]

    def close(self) -> None:
        self.image.close()


def _array(batch: Any, device: str) -> Any:
    """A cuCIM image as a numpy (CPU) or cupy (CUDA) array without copying."""
    if device == "cuda":
        import cupy

        return cupy.asarray(batch)
    return np.asarray(batch)


def _regions(read_one: Callable[[int, int], np.ndarray], locations: np.ndarray, batch_size: int,
             num_workers: int) -> Iterator[np.ndarray]:
    """Batches of regions read one by one (on a thread pool when num_workers > 1)."""
    pool = ThreadPoolExecutor(num_workers) if num_workers > 1 else None
    mapper = pool.map if pool else map
    try:
        for start in range(0, len(locations), batch_size):
            chunk = locations[start: start + batch_size]
            yield np.stack(list(mapper(lambda xy: read_one(int(xy[0]), int(xy[1])), chunk)))
    finally:
        if pool:
            pool.shutdown()


class _Tifffile:
    """tifffile backend: decodes only the tiles a region needs (small per-reader tile cache)."""

    def __init__(self, path: str, device: str, cache_tiles: int = 256) -> None:
        import tifffile

        self.tif = tifffile.TiffFile(path)
        pages = sorted((p for p in self.tif.pages if p.is_tiled and p.samplesperpixel >= 3),
                       key=lambda p: -p.imagewidth)
        if not pages:
            raise ValueError("no tiled RGB image in the file")
        self.pages = pages
        self.dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        self.downsamples = tuple(self.dimensions[0][0] / w for w, _ in self.dimensions)
        self.mpp = self._mpp(pages[0])
        self.fd = os.open(path, os.O_RDONLY)
        self.cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.cache_tiles = cache_tiles
        self.lock = threading.Lock()

    @staticmethod
    def _mpp(page: Any) -> float | None:
        mpp = _aperio_mpp(page.description)
        if mpp:
            return mpp
        unit = {2: 2.54e4, 3: 1e4}.get(int(page.resolutionunit or 1))  # inch, centimetre
        x_res = page.resolution[0] if page.resolution else 0
        return unit / x_res if unit and x_res > 1 else None

    def _tile(self, level: int, index: int) -> np.ndarray:
        with self.lock:
            tile = self.cache.get((level, index))
            if tile is not None:
                self.cache.move_to_end((level, index))
                return tile
        page = self.pages[level]
        data = os.pread(self.fd, int(page.databytecounts[index]), int(page.dataoffsets[index]))
        tile = page.decode(data, index, jpegtables=page.jpegtables)[0][0][..., :3]
        with self.lock:
            self.cache[(level, index)] = tile
            if len(self.cache) > self.cache_tiles:
                self.cache.popitem(last=False)
        return tile

    def region(self, level: int, x0: int, y0: int, size: int) -> np.ndarray:
        """`size` x `size` RGB at `level`, top-left (x0, y0) in level-0 px; outside the image is white."""
        page = self.pages[level]
        x, y = int(x0 / self.downsamples[level]), int(y0 / self.downsamples[level])
        tw, th = page.tilewidth, page.tilelength
        width, height = self.dimensions[level]
        across = -(-width // tw)
        out = np.full((size, size, 3), 255, np.uint8)
        for ty in range(max(0, y // th), min(-(-(y + size) // th), -(-height // th))):
            for tx in range(max(0, x // tw), min(-(-(x + size) // tw), across)):
                tile = self._tile(level, ty * across + tx)
                ys = slice(max(y, ty * th), min(y + size, (ty + 1) * th, height))
                xs = slice(max(x, tx * tw), min(x + size, (tx + 1) * tw, width))
                out[ys.start - y: ys.stop - y, xs.start - x: xs.stop - x] = \
                    tile[ys.start - ty * th: ys.stop - ty * th, xs.start - tx * tw: xs.stop - tx * tw]
        return out

    def batches(self, locations: np.ndarray, size: int, level: int, batch_size: int, num_workers: int) -> Iterator[np.ndarray]:
        return _regions(lambda x, y: self.region(level, x, y, size), locations, batch_size, num_workers)

    def read_level(self, level: int) -> np.ndarray:
        return self.pages[level].asarray()[..., :3]

    def close(self) -> None:
        os.close(self.fd)
        self.tif.close()


class _OpenSlide:
    """OpenSlide backend (NDPI, MRXS, ... and everything cuCIM reads); transparent areas become white."""

    def __init__(self, path: str, device: str) -> None:
        import openslide

        self.slide = openslide.OpenSlide(path)
        self.dimensions = tuple(tuple(int(v) for v in d) for d in self.slide.level_dimensions)
        self.downsamples = tuple(float(d) for d in self.slide.level_downsamples)
        mpp = self.slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        rgba = np.asarray(self.slide.read_region((x, y), level, (width, height)))
        if rgba[..., 3].min() == 255:
            return rgba[..., :3]
        alpha = rgba[..., 3:].astype(np.float32) / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)

    def batches(self, locations: np.ndarray, size: int, level: int, batch_size: int, num_workers: int) -> Iterator[np.ndarray]:
        return _regions(lambda x, y: self._read(x, y, level, size, size), locations, batch_size, num_workers)

    def read_level(self, level: int) -> np.ndarray:
        return self._read(0, 0, level, *self.dimensions[level])

    def close(self) -> None:
        self.slide.close()


_BACKENDS: dict[str, Callable[[str, str], Any]] = {"cucim": _Cucim, "tifffile": _Tifffile, "openslide": _OpenSlide}
