"""Integrity of JPEG tiles in TIFF slides, checked from their bytes without decoding.

cuCIM decodes a corrupt JPEG tile into grey or garbage pixels without raising, so a damaged slide
would be embedded silently. This check reads the bytes of each JPEG tile under a read (once per
tile) and verifies the marker structure: SOI/EOI, intact segment headers, no stray marker inside
the entropy-coded data. It costs ~2-3 % of a cuCIM read; damage that keeps the markers valid
(flipped bits inside the data) is not caught.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger("hnm_ray")

JPEG_COMPRESSION = 7  # TIFF Compression tag value of (new-style) JPEG tiles
FIX_CORRUPT_TILE = ("cuCIM decodes such a tile into gray or garbage pixels without raising; re-copy, re-scan or "
                     "re-export the slide, or drop it from the manifest")


_BETWEEN_SCANS = frozenset([0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)])  # DHT, DAC, SOS, DQT, ...
_PROGRESSIVE = frozenset([0xC2, 0xC6, 0xCA, 0xCE])


def jpeg_tile_problem(data: bytes) -> str | None:
    """Why the bytes of one TIFF JPEG tile are corrupt, or None when its marker structure is sound.

    A structural check, about 10-30 us a tile (a few % of decoding it): SOI at the start, EOI at the end,
    intact segment headers, and inside the entropy-coded data no byte pair FF xx other than FF00 (stuffing),
    FFD0-FFD7 (restarts), FF fill bytes and the segments that may separate scans. Noise written over a tile
    almost always breaks one of these; libjpeg inside cuCIM then prints "Unsupported marker type" and returns
    gray pixels instead of raising. Damage that keeps the markers valid (a flipped bit in the coded data) is
    not detected; progressive tiles get the SOI/EOI/header checks only.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return "it does not start with a JPEG start-of-image marker (FFD8)"
    end = data.rfind(b"\xff\xd9", max(2, n - 64))  # some writers pad tiles after EOI
    if end < 0:
        return "it does not end with a JPEG end-of-image marker (FFD9): the tile is cut short or overwritten"
    pos = 2
    while True:  # segment headers up to a start of scan, then that scan's entropy-coded data
        if pos + 4 > end or data[pos] != 0xFF:
            return f"its JPEG segment headers are broken at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return f"JPEG segment FF{marker:02X} at byte {pos} has an impossible length {length}"
        if marker in _PROGRESSIVE:
            return None  # progressive scans interleave further segments: only SOI/EOI/headers are checked
        pos += 2 + length
        if marker != 0xDA:
            continue
        scan = np.frombuffer(data, np.uint8, count=max(0, end - pos), offset=min(pos, end))
        ff = np.flatnonzero(scan[:-1] == 0xFF)
        after = scan[ff + 1]
        bad = (after != 0) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))
        if not bad.any():
            return None
        i = int(np.argmax(bad))
        at, marker = pos + int(ff[i]), int(after[i])
        if marker not in _BETWEEN_SCANS:
            return f"invalid marker FF{marker:02X} inside its entropy-coded data at byte {at}"
        pos = at  # the next scan of a multi-scan JPEG: parse its segments


class TileIntegrity:
    """Checks the JPEG tiles of a TIFF slide that reads touch, each tile once (cuCIM decodes corrupt tiles silently)."""

    def __init__(self, path: str, level_dimensions: tuple[tuple[int, int], ...]) -> None:
        import tifffile

        self.path = path
        self.levels: list[dict[str, Any] | None] = []
        with tifffile.TiffFile(path) as tif:  # the pyramid levels as cuCIM and the tifffile backend see them
            pages = sorted((p for p in tif.pages if p.is_tiled and p.samplesperpixel >= 3), key=lambda p: -p.imagewidth)
            if [(int(p.imagewidth), int(p.imagelength)) for p in pages] != [tuple(d) for d in level_dimensions]:
                return  # pages do not map onto the reader's levels: nothing to check against
            for p in pages:
                self.levels.append(None if p.compression != JPEG_COMPRESSION else {
                    "tile": (int(p.tilewidth), int(p.tilelength)),
                    "grid": (-(-int(p.imagewidth) // int(p.tilewidth)), -(-int(p.imagelength) // int(p.tilelength))),
                    "offsets": np.asarray(p.dataoffsets, np.int64), "counts": np.asarray(p.databytecounts, np.int64),
                    "checked": np.zeros(len(p.dataoffsets), bool)})
        self.fd = os.open(path, os.O_RDONLY) if any(self.levels) else None

    def problem(self, locations: np.ndarray, size: int, level: int, downsample: float) -> str | None:
        """Why a TIFF tile under these reads (level-0 (x, y), `size` px at `level`) is corrupt, or None."""
        info = self.levels[level] if self.fd is not None and level < len(self.levels) else None
        if info is None or not len(locations):
            return None
        (tw, th), (across, down) = info["tile"], info["grid"]
        xy = np.floor(np.asarray(locations, np.float64) / downsample).astype(np.int64)
        first = np.stack([xy[:, 0] // tw, xy[:, 1] // th], axis=1)
        last = np.stack([(xy[:, 0] + size - 1) // tw, (xy[:, 1] + size - 1) // th], axis=1)
        span = int((last - first).max()) + 1
        cells = [np.stack([first[:, 0] + dx, first[:, 1] + dy], axis=1)[
                     (first[:, 0] + dx <= last[:, 0]) & (first[:, 1] + dy <= last[:, 1])]
                 for dy in range(span) for dx in range(span)]
        cells = np.concatenate(cells)
        cells = cells[(cells[:, 0] >= 0) & (cells[:, 0] < across) & (cells[:, 1] >= 0) & (cells[:, 1] < down)]
        indices = np.unique(cells[:, 1] * across + cells[:, 0])
        for index in indices[~info["checked"][indices]]:
            offset, count = int(info["offsets"][index]), int(info["counts"][index])
            if count:  # a 0-byte tile is a missing (background) tile, not a corrupt one
                data = os.pread(self.fd, count, offset)
                reason = jpeg_tile_problem(data) if len(data) == count else "the file ends inside it"
                if reason:
                    return (f"corrupt JPEG tile {index} of level {level} (bytes {offset}..{offset + count} of "
                            f"{self.path}): {reason}")
            info["checked"][index] = True
        return None

    def close(self) -> None:
        """Release the file."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def tile_integrity(reader: Any) -> TileIntegrity | None:
    """The JPEG tile check of an open TIFF slide (None for OpenSlide formats or a TIFF it cannot map)."""
    if reader.info.backend == "openslide":
        return None
    try:
        return TileIntegrity(reader.path, reader.info.level_dimensions)
    except Exception as exc:  # noqa: BLE001 - the check is a safety net; the reader already validated the file
        log.debug("no JPEG tile check for %s: %s", reader.path, exc)
        return None
