"""Whole-slide image reader: cuCIM `CuImage` with batched tile reads; tifffile and OpenSlide behind the same API.

Backends: "cucim" (SVS, generic tiled TIFF, Philips TIFF; the default), "tifffile" (used automatically, with a
log line, only where cuCIM cannot be imported), "openslide" (NDPI, MRXS and the other OpenSlide formats; chosen
automatically for their file extensions). A `CuImage` cannot be pickled, so a pickled `SlideReader` carries
only its arguments and re-opens the slide where it is unpickled (open readers inside each task or actor).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hnm_ray.config import TissueConfig
from hnm_ray.core.errors import ConfigError, SlideError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cucim", "tifffile", "openslide")
DEVICES = ("auto", "cpu", "cuda")
OPENSLIDE_ONLY = (".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_UM_PER_UNIT = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "millimeter": 1e3, "mm": 1e3,
                "centimeter": 1e4, "cm": 1e4, "nanometer": 1e-3, "nm": 1e-3}
_FIX_FORMAT = ("hnm-ray reads TIFF-based slides (SVS, generic tiled TIFF, Philips TIFF) with cuCIM; "
               "re-export or re-scan the slide; NDPI/MRXS/SCN slides are read with OpenSlide once openslide-python "
               "is installed (pip install 'hnm-ray[openslide]')")


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: backend, pyramid levels ((width, height) and downsample each) and level-0 microns/pixel."""

    slide_id: str
    path: str
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel at `level` (None when the slide has no MPP)."""
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]


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


@functools.cache
def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - a broken install (missing CUDA libs, ...) counts as absent
        log.debug("cannot import %s: %s", module, exc)
        return False
    return True


@functools.cache
def cuda_available() -> bool:
    """True when cupy sees a CUDA device (the reliable GPU test; cucim.is_available() is not)."""
    if not _importable("cupy"):
        return False
    import cupy

    try:
        return bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 - no driver
        return False


def choose_backend(path: str | Path, backend: str = "auto") -> str:
    """The backend for a slide: cuCIM, OpenSlide for OpenSlide-only formats, tifffile where cuCIM cannot import."""
    if backend not in BACKENDS:
        raise ConfigError("backend", f"{backend!r} is not one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if Path(path).suffix.lower() in OPENSLIDE_ONLY and _importable("openslide"):
        return "openslide"
    if _importable("cucim"):
        return "cucim"
    log.warning("cuCIM cannot be imported here: reading slides with tifffile (CPU, slower). "
                "Install cucim-cu12 (CUDA 12) or cucim-cu13 for fast decoding.")
    return "tifffile"


def _choose_device(device: str, backend: str) -> str:
    if device not in DEVICES:
        raise ConfigError("device", f"{device!r} is not one of {list(DEVICES)}")
    if device == "auto":
        return "cuda" if backend == "cucim" and cuda_available() else "cpu"
    if device == "cuda" and (backend != "cucim" or not cuda_available()):
        raise ConfigError("device", "'cuda' needs the cucim backend and a GPU visible to cupy "
                          "(cupy.cuda.is_available() is False here); use device='cpu' or 'auto'")
    return device


def _check_tiff_header(path: str, slide_id: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head not in _TIFF_MAGIC:
        raise SlideError(slide_id, f"{path} is not a TIFF file (it starts with {head!r})", _FIX_FORMAT)


def check_tiff_structure(path: str, slide_id: str) -> None:
    """Raise SlideError when a TIFF's page chain is broken or its image data runs past the end of the file."""
    import tifffile

    errors: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    handler = _Collect(logging.ERROR)
    tiff_log = logging.getLogger("tifffile")
    tiff_log.addHandler(handler)
    try:
        size = os.path.getsize(path)
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                if len(ends) and ends.max() > size:
                    errors.append(f"image data of page {i} ends at byte {ends.max()} but the file has {size} bytes")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        tiff_log.removeHandler(handler)
    if errors:
        raise SlideError(slide_id, f"truncated or corrupt TIFF {path}: {errors[0]}",
                         "re-copy the file (incomplete download?) or drop the slide from the manifest")


class SlideReader:
    """One open slide: metadata, thumbnail and batched tile reads (a context manager)."""

    def __init__(self, path: str | Path, slide_id: str | None = None, backend: str = "auto", device: str = "auto") -> None:
        self.path = str(path)
        self.slide_id = slide_id or Path(path).stem
        self._args = (self.path, slide_id, backend, device)
        if not Path(self.path).is_file():
            raise SlideError(self.slide_id, f"file not found: {self.path}",
                             "check the manifest's path (relative paths resolve against the manifest's folder)")
        name = choose_backend(self.path, backend)
        if name != "openslide":
            _check_tiff_header(self.path, self.slide_id)
        self.device = _choose_device(device, name)
        try:
            self._backend = _BACKENDS[name](self.path, self.device)
        except Exception as exc:  # noqa: BLE001 - every backend has its own exception types
            raise SlideError(self.slide_id, f"{name} cannot open {self.path} ({type(exc).__name__}: {exc})",
                             _FIX_FORMAT) from exc
        b = self._backend
        self.info = SlideInfo(self.slide_id, self.path, name, b.dimensions, b.downsamples, b.mpp)

    def __reduce__(self) -> tuple[type, tuple]:
        return SlideReader, self._args

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideReader({self.path!r}, backend={self.info.backend!r}, levels={self.info.level_dimensions})"

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.info.level_count:
            raise SlideError(self.slide_id, f"level {level} does not exist (the slide has {self.info.level_count} levels)",
                             "choose a level below level_count or tile by mpp")

    def thumbnail(self, max_size: int = 1024, max_pixels: int | None = None) -> np.ndarray:
        """RGB uint8 (H, W, 3), longest side max_size, from the smallest level at least that large among those of at
        most `max_pixels` (default: tiling.tissue.max_decoded_pixels); SlideError when every level is larger."""
        max_pixels = max_pixels or TissueConfig().max_decoded_pixels
        dims = self.info.level_dimensions
        fitting = [i for i, (w, h) in enumerate(dims) if w * h <= max_pixels]
        if not fitting:
            w, h = dims[-1]
            raise SlideError(self.slide_id, f"its smallest pyramid level is {w}x{h} px, more than the {max_pixels} "
                                            "px a thumbnail may decode (tiling.tissue.max_decoded_pixels)",
                             "give the slide a pyramid (e.g. vips tiffsave --pyramid --tile) or, for a trusted "
                             "slide, raise --tiling.tissue.max_decoded_pixels")
        level = max((i for i in fitting if max(dims[i]) >= max_size), default=min(fitting))
        try:
            image = self._backend.read_level(level)
        except Exception as exc:  # noqa: BLE001
            raise SlideError(self.slide_id, f"cannot read level {level} for the thumbnail ({exc})") from exc
        scale = max_size / max(image.shape[:2])
        if scale >= 1:
            return np.ascontiguousarray(image)
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))

    def _batches(self, locations: np.ndarray, size: int, level: int, batch_size: int, num_workers: int) -> Iterator[Any]:
        """Backend batches (only valid until the next step) with errors turned into SlideError."""
        self._check_level(level)
        try:
            yield from self._backend.batches(locations, size, level, max(1, batch_size), num_workers)
        except Exception as exc:  # noqa: BLE001
            raise SlideError(self.slide_id, f"cannot read {size}px tiles at level {level} ({type(exc).__name__}: {exc})",
                             "the file may be truncated or use an unsupported compression (zstd, WebP, JPEG 2000 "
                             "open but fail at read time in cuCIM); re-export it as a JPEG-compressed SVS or tiled TIFF") from exc

    def iter_tiles(self, locations: np.ndarray, size: int, level: int = 0, batch_size: int = 64,
                   num_workers: int = 1) -> Iterator[Any]:
        """Tiles in batches (B, size, size, 3) uint8; locations (N, 2) are level-0 (x, y) of top-left corners."""
        locations = np.asarray(locations, np.int64).reshape(-1, 2)
        for batch in self._batches(locations, size, level, batch_size, num_workers):
            yield batch.copy()

    def read_tiles(self, locations: np.ndarray, size: int, level: int = 0, batch_size: int = 64,
                   num_workers: int = 1) -> Any:
        """All tiles as one (N, size, size, 3) uint8 array (cupy when device == 'cuda')."""
        locations = np.asarray(locations, np.int64).reshape(-1, 2)
        if self.device == "cuda":
            import cupy as xp
        else:
            xp = np
        out = xp.empty((len(locations), size, size, 3), xp.uint8)
        done = 0
        if len(locations):
            for batch in self._batches(locations, size, level, batch_size, num_workers):
                out[done: done + len(batch)] = batch
                done += len(batch)
        if done != len(locations):
            raise SlideError(self.slide_id, f"the reader returned {done} of {len(locations)} tiles")
        return out

    def validate(self) -> None:
        """Raise SlideError unless the file is structurally sound and a tile of the first and last level decodes."""
        if self.info.backend != "openslide":
            check_tiff_structure(self.path, self.slide_id)
        for level in (0, self.info.level_count - 1):
            w, h = self.info.level_dimensions[level]
            size = max(1, min(256, w, h))
            ds = self.info.level_downsamples[level]
            centre = [[int((w - size) // 2 * ds), int((h - size) // 2 * ds)]]
            self.read_tiles(np.array(centre), size, level)

    def close(self) -> None:
        """Release the file."""
        backend = self.__dict__.pop("_backend", None)
        if backend is not None:
            backend.close()


def open_slide(path: str | Path, slide_id: str | None = None, backend: str = "auto", device: str = "auto",
               validate: bool = True) -> SlideReader:
    """Open a slide; with `validate` also check its structure and decode a tile (SlideError naming the cause)."""
    reader = SlideReader(path, slide_id, backend, device)
    if validate:
        try:
            reader.validate()
        except Exception:
            reader.close()
            raise
    return reader
