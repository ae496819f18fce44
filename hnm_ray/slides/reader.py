"""Whole-slide image reader: cuCIM `CuImage` with batched tile reads; tifffile and OpenSlide behind the same API
(the backends: backends.py).

Backends: "cucim" (SVS, generic tiled TIFF, Philips TIFF; the default), "tifffile" (used automatically, with a
log line, only where cuCIM cannot be imported), "openslide" (NDPI, MRXS and the other OpenSlide formats; chosen
automatically for their file extensions). A `CuImage` cannot be pickled, so a pickled `SlideReader` carries
only its arguments and re-opens the slide where it is unpickled (open readers inside each task or actor).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hnm_ray.config import TissueConfig
from hnm_ray.core.errors import ConfigError, SlideError
from hnm_ray.slides.backends import _BACKENDS

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cucim", "tifffile", "openslide")
DEVICES = ("auto", "cpu", "cuda")
OPENSLIDE_ONLY = (".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
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
