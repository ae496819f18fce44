"""Demo cohort: synthetic H&E-like pyramidal JPEG TIFF slides with tumour regions, tumour mimics and masks.

Level 0 is 0.5 um/px (20x). Normal tissue is pink eosin stroma with small nuclei (round lymphocytes,
elongated fibroblasts) on a white background. Tumour regions (micro-metastases, a few % of the tissue of
positive slides) have large, crowded, irregular vesicular nuclei with nucleoli on purple cytoplasm.
Tumour mimics (in half of the slides of each class) share the tumour's purple colour but not its morphology:
lymphoid aggregates of small dark round nuclei, and streams of aligned spindle nuclei.
Slides are written SVS-style (Aperio ImageDescription with MPP, every pyramid level a top-level tiled
page) so cuCIM, OpenSlide and tifffile all read them; positive slides get `<slide_id>_mask.png`.
"""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

MPP = 0.5
TILE = 256
LEVEL_DOWNSAMPLE = 4
MASK_DOWNSAMPLE = 4
JPEG_QUALITY = 90
STRIP_ROWS = 512

BACKGROUND, NORMAL, LYMPHOID, SPINDLE, TUMOUR = range(5)

# Optical densities of haematoxylin (nuclei, purple-blue) and eosin (stroma, pink), after Ruifrok & Johnston.
_H_OD = np.array([0.65, 0.70, 0.29], np.float32)
_E_OD = np.array([0.07, 0.99, 0.30], np.float32)
# Per tissue class: eosin and cytoplasm haematoxylin (mimics share the tumour's purple cytoplasm).
_EOSIN = np.array([0.0, 0.55, 0.30, 0.30, 0.30], np.float32)
_CYTO_H = np.array([0.0, 0.04, 0.30, 0.30, 0.30], np.float32)
# Rendering goes through a colour table indexed by quantised (class, fibre texture, nucleus, grain).
_FIBRE_LEVELS, _NUCLEUS_LEVELS, _GRAIN_LEVELS, _NUCLEUS_MAX = 16, 64, 8, 1.6


@dataclass(frozen=True)
class _Nuclei:
    """Nuclei of one tissue class: one per cell of a jittered (rotated) grid, elliptic, optionally irregular."""

    cell: tuple[float, float]           # grid cell (along, across) in level-0 px
    occupancy: float                    # fraction of cells holding a nucleus
    radius: tuple[float, float]         # long semi-axis range (px)
    aspect: tuple[float, float]         # short / long semi-axis range
    stain: float                        # haematoxylin of dense chromatin
    spread: float = np.pi               # orientation spread around the class angle (radians)
    roughness: float = 0.0              # amplitude of outline harmonics (irregular, pleomorphic nuclei)
    vesicular: bool = False             # pale centre, dark rim, nucleolus (tumour)


_NUCLEI = {
    NORMAL: _Nuclei((26, 26), 0.32, (3.5, 9.0), (0.3, 1.0), 1.05),
    LYMPHOID: _Nuclei((14, 14), 0.92, (4.0, 5.2), (0.85, 1.0), 0.95),
    SPINDLE: _Nuclei((34, 11), 0.90, (11.0, 15.0), (0.2, 0.28), 1.0, spread=0.15),
    TUMOUR: _Nuclei((27, 27), 0.95, (9.0, 13.0), (0.7, 1.0), 1.25, roughness=0.08, vesicular=True),
}


class _Noise:
    """Smooth value noise on a random grid, evaluated on any window (so strips of an image agree)."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> None:
        self.cell = cell
        self.grid = rng.random((int(shape[0] / cell[0]) + 3, int(shape[1] / cell[1]) + 3), dtype=np.float32)

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Noise in [0, 1] for rows y0:y1 and columns x0:x1."""
        return _lerp(_lerp(self.grid, y0, y1, self.cell[0], 0), x0, x1, self.cell[1], 1)


def _lerp(a: np.ndarray, start: int, stop: int, cell: float, axis: int) -> np.ndarray:
    """Smoothstep interpolation of a coarse grid along one axis at pixels start:stop."""
    pos = (np.arange(start, stop, dtype=np.float32) + 0.5) / cell
    i = np.floor(pos).astype(np.intp)
    t = pos - i
    t = (t * t * (3 - 2 * t)).reshape((-1, 1) if axis == 0 else (1, -1))
    a0, a1 = np.take(a, i, axis), np.take(a, i + 1, axis)
    return a0 + (a1 - a0) * t


def _place(labels: np.ndarray, value: int, radius: float, rng: np.random.Generator) -> None:
    """Paint one irregular blob of class `value` inside normal tissue (shrunk until it fits)."""
    normal = np.zeros((labels.shape[0] + 1, labels.shape[1] + 1), np.int64)
    normal[1:, 1:] = (labels == NORMAL).cumsum(0).cumsum(1)
    while radius >= 4:
        r = int(radius * 1.5) + 1
        side = 2 * r + 1
        box = normal[side:, side:] - normal[:-side, side:] - normal[side:, :-side] + normal[:-side, :-side]
        ys, xs = np.nonzero(box >= 0.97 * side * side)  # top-left corners of (almost) all-normal windows
        if len(ys):
            k = rng.integers(len(ys))
            yy, xx = np.mgrid[-r: r + 1, -r: r + 1].astype(np.float32)
            theta = np.arctan2(yy, xx)
            outline = 1 + sum(rng.uniform(0.04, 0.16) * np.cos(h * theta + rng.uniform(0, 2 * np.pi)) for h in (2, 3, 5))
            window = labels[ys[k]: ys[k] + side, xs[k]: xs[k] + side]
            window[(np.hypot(yy, xx) <= radius * outline) & (window == NORMAL)] = value
            return
        radius *= 0.8


def _label_map(rng: np.random.Generator, shape: tuple[int, int], positive: bool, mimics: bool) -> np.ndarray:
    """Per-pixel tissue class at mask resolution (level 0 / MASK_DOWNSAMPLE)."""
    h, w = shape
    noise = sum(_Noise(rng, shape, (h / c, w / c)).window(0, h, 0, w) * a for c, a in ((3, 1.0), (7, 0.5), (15, 0.25)))
    yy, xx = np.mgrid[:h, :w]
    edge = np.minimum(np.minimum(yy, h - 1 - yy) / h, np.minimum(xx, w - 1 - xx) / w)
    field = noise * np.clip(edge / 0.12, 0, 1)
    labels = np.where(field > np.quantile(field, 0.55), NORMAL, BACKGROUND).astype(np.uint8)
    um = MPP * MASK_DOWNSAMPLE  # microns per mask pixel
    if positive:  # tumour first: it gets the room, mimics shrink if they must
        for _ in range(1 + int((labels == NORMAL).sum() * um**2 > 2e6 and rng.random() < 0.5)):
            _place(labels, TUMOUR, rng.uniform(120, 180) / um, rng)
    if mimics:
        kinds = [LYMPHOID, SPINDLE] if rng.random() < 0.5 else [SPINDLE, LYMPHOID]
        for value in kinds[: rng.integers(1, 3)]:
            _place(labels, value, rng.uniform(100, 170) / um, rng)
    return labels


def _nucleus_map(rng: np.random.Generator, labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Level-0 nucleus haematoxylin, quantised to _NUCLEUS_LEVELS (int32 (H, W)); class of the centre pixel."""
    haem = np.zeros((height, width), np.float32)
    flat = haem.reshape(-1)
    m = MASK_DOWNSAMPLE
    for value, spec in _NUCLEI.items():
        angle = rng.uniform(0, np.pi)
        reach = np.hypot(height, width)
        a, b = np.meshgrid(np.arange(-reach, reach, spec.cell[0]), np.arange(-reach, reach, spec.cell[1]), indexing="ij")
        a = a.ravel() + rng.uniform(0.3, 0.7, a.size) * spec.cell[0]
        b = b.ravel() + rng.uniform(0.3, 0.7, b.size) * spec.cell[1]
        cx, cy = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
        keep = (cx >= 0) & (cy >= 0) & (cx < width) & (cy < height) & (rng.random(cx.size) < spec.occupancy)
        cx, cy = cx[keep], cy[keep]
        on = labels[(cy // m).astype(np.intp), (cx // m).astype(np.intp)] == value
        cx, cy = cx[on], cy[on]
        n = cx.size
        if n == 0:
            continue
        rl = rng.uniform(*spec.radius, n).astype(np.float32)
        rs = rl * rng.uniform(*spec.aspect, n).astype(np.float32)
        phi = (angle + rng.uniform(-spec.spread, spec.spread, n)).astype(np.float32)
        half = int(np.ceil(spec.radius[1] * (1 + 3 * spec.roughness))) + 1
        off = np.arange(-half, half + 1, dtype=np.float32)
        dy = off[None, :, None] - (cy - np.floor(cy)).astype(np.float32)[:, None, None]
        dx = off[None, None, :] - (cx - np.floor(cx)).astype(np.float32)[:, None, None]
        c, s = np.cos(phi)[:, None, None], np.sin(phi)[:, None, None]
        along, across = dx * c + dy * s, -dx * s + dy * c
        d = np.sqrt((along / rl[:, None, None]) ** 2 + (across / rs[:, None, None]) ** 2)
        if spec.roughness:
            theta = np.arctan2(across, along)
            outline = 1 + sum(spec.roughness * rng.uniform(0.3, 1.0, (n, 1, 1)).astype(np.float32)
                              * np.cos(h * theta + rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)) for h in (2, 3, 4))
            d = d / outline
        body = np.clip((1.0 - d) * rl[:, None, None] * 0.8, 0, 1)
        density = rng.uniform(0.8, 1.0, (n, 1, 1)).astype(np.float32)
        if spec.vesicular:
            rim = np.clip((d - 0.6) / 0.25, 0, 1)
            speckle = rng.random(body.shape, dtype=np.float32)
            nucleolus = np.clip((0.2 - d) * 10.0, 0, 1)
            patch = body * density * (0.25 + 0.45 * rim + 0.3 * speckle) + 0.8 * nucleolus
        else:
            patch = body * density
        ys = np.floor(cy).astype(np.intp)[:, None, None] + off.astype(np.intp)[None, :, None]
        xs = np.floor(cx).astype(np.intp)[:, None, None] + off.astype(np.intp)[None, None, :]
        ys, xs = np.broadcast_arrays(ys, xs)
        hit = (patch > 0.01) & (ys >= 0) & (xs >= 0) & (ys < height) & (xs < width)
        np.maximum.at(flat, ys[hit] * width + xs[hit], spec.stain * patch[hit])
    return np.rint(np.minimum(haem, _NUCLEUS_MAX) * ((_NUCLEUS_LEVELS - 1) / _NUCLEUS_MAX)).astype(np.int32)


def _colour_table(stain: np.ndarray) -> np.ndarray:
    """RGB (uint8) of every (class, fibre, nucleus, grain) level by Beer-Lambert mixing of H and E."""
    lab = np.arange(len(_EOSIN))[:, None, None, None]
    fib = ((np.arange(_FIBRE_LEVELS) + 0.5) / _FIBRE_LEVELS)[None, :, None, None]
    nuc = (np.arange(_NUCLEUS_LEVELS) * _NUCLEUS_MAX / (_NUCLEUS_LEVELS - 1))[None, None, :, None]
    grain = ((np.arange(_GRAIN_LEVELS) - (_GRAIN_LEVELS - 1) / 2) / 2)[None, None, None, :]
    eosin = _EOSIN[lab] * (0.6 + 0.8 * fib) * (1.0 - 0.6 * np.minimum(nuc, 1.0))
    haem = _CYTO_H[lab] * (0.8 + 0.4 * fib) + nuc
    od = (haem[..., None] * stain[0] + eosin[..., None] * stain[1]) * (1.0 + 0.05 * grain[..., None])
    rgb = 244.0 * np.exp(-od) + 2.0 * grain[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8).reshape(-1, 3)


def _render_strip(labels: np.ndarray, nuclei: np.ndarray, fibres: _Noise, table: np.ndarray,
                  rng: np.random.Generator, y0: int, y1: int) -> np.ndarray:
    """RGB uint8 of level-0 rows y0:y1, looked up in the colour table."""
    m = MASK_DOWNSAMPLE
    width = nuclei.shape[1]
    lab = np.repeat(np.repeat(labels[y0 // m: (y1 + m - 1) // m], m, 0), m, 1)[: y1 - y0, :width]
    fib = (fibres.window(y0, y1, 0, width) * (_FIBRE_LEVELS - 1e-3)).astype(np.int32)
    grain = np.frombuffer(rng.bytes(lab.size), np.uint8).reshape(lab.shape) % _GRAIN_LEVELS
    index = ((lab.astype(np.int32) * _FIBRE_LEVELS + fib) * _NUCLEUS_LEVELS + nuclei[y0:y1]) * _GRAIN_LEVELS + grain
    return table[index]


def render_slide(seed: int | tuple[int, ...], width: int, height: int, positive: bool, mimics: bool) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic slide: (level-0 RGB uint8 (H,W,3), tumour mask bool at 1/MASK_DOWNSAMPLE)."""
    rng = np.random.default_rng(seed)
    labels = _label_map(rng, (height // MASK_DOWNSAMPLE, width // MASK_DOWNSAMPLE), positive, mimics)
    nuclei = _nucleus_map(rng, labels, height, width)
    fibres = _Noise(rng, (height, width), (6, 40) if rng.random() < 0.5 else (40, 6))
    table = _colour_table(np.stack([_H_OD, _E_OD]) * rng.uniform(0.9, 1.1, (2, 1)))
    image = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, STRIP_ROWS):
        y1 = min(y0 + STRIP_ROWS, height)
        image[y0:y1] = _render_strip(labels, nuclei, fibres, table, rng, y0, y1)
    return image, labels == TUMOUR


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample of an (H,W,3) uint8 image by an integer factor (H, W cropped to multiples)."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return (blocks.sum((1, 3), dtype=np.uint32) // factor**2).astype(np.uint8)


def write_pyramid(path: str | Path, image: np.ndarray, mpp: float | None = MPP, min_levels: int = 3,
                  quality: int = JPEG_QUALITY) -> Path:
    """Write an SVS-style pyramidal tiled JPEG TIFF: levels as top-level pages, a thumbnail page, MPP in the description.

    Page order follows Aperio: level 0, a stripped thumbnail (<= 1024 px), then the reduced levels (4x each), so
    cuCIM, OpenSlide and tifffile all see every level; SubIFDs would show as one level.
    """
    path = Path(path)
    levels = [image]
    while len(levels) < min_levels or max(levels[-1].shape[:2]) // LEVEL_DOWNSAMPLE >= TILE:
        levels.append(_downsample(levels[-1], LEVEL_DOWNSAMPLE))
    thumbnail = next(level for level in levels if max(level.shape[:2]) <= 1024)
    h, w = image.shape[:2]
    description = f"Aperio Image Library v10.0.0 hnm-ray demo\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
    if mpp is not None:
        description += f"|AppMag = {10 / mpp:g}|MPP = {mpp:g}"
    pages = [(levels[0], 1), (thumbnail, None)] + [(level, LEVEL_DOWNSAMPLE**i) for i, level in enumerate(levels[1:], 1)]
    with tifffile.TiffWriter(path) as tif:
        for data, downsample in pages:
            resolution = {}
            if mpp is not None and downsample is not None:
                px_per_cm = 1e4 / (mpp * downsample)
                resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tiling = {"tile": (TILE, TILE)} if downsample is not None else {"rowsperstrip": 16}
            tif.write(data, photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                      description=description, metadata=None, software="hnm-ray", **tiling, **resolution)
    return path


def _splits(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Stratified train/val/test: per class a quarter (rounded) to val and to test, the rest to train."""
    splits = [""] * len(labels)
    for label in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_eval = (len(idx) + 1) // 4
        for j, i in enumerate(idx):
            splits[i] = "test" if j < n_eval else "val" if j < 2 * n_eval else "train"
    return splits


def cohort_plan(n_slides: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What a demo cohort holds, without rendering it: labels (half tumour), tumour-mimic flags (half of each class)
    and stratified splits (a quarter of each class to val and to test)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n_slides) % 2)
    mimics = np.zeros(n_slides, bool)
    for label in (0, 1):  # half of the slides of each class carry tumour mimics
        members = rng.permutation(np.flatnonzero(labels == label))
        mimics[members[: (len(members) + 1) // 2]] = True
    return labels, mimics, _splits(labels, rng)


def make_demo_cohort(out: str | Path, n_slides: int = 64, seed: int = 0, size: int = 2048) -> Path:
    """Write n_slides synthetic slides (half with tumour, with masks) and out/manifest.csv; return its path.

    Deterministic for a seed (byte-identical files). The manifest is written last, so its presence means the
    cohort is complete. About 0.9 s per 4096-px slide on one core (a quarter of it at 2048 px), slides written in
    parallel threads.
    """
    if n_slides < 1 or size < 512:
        raise ValueError(f"make_demo_cohort needs n_slides >= 1 and size >= 512 (got {n_slides}, {size})")
    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    labels, mimics, splits = cohort_plan(n_slides, seed)
    width = size // 64 * 64
    height = int(size * 0.75) // 64 * 64

    def write_slide(i: int) -> dict[str, Any]:
        slide_id = f"demo_{i:03d}"
        image, tumour = render_slide((seed, i), width, height, bool(labels[i]), bool(mimics[i]))
        slide = write_pyramid(out / "slides" / f"{slide_id}.svs", image)
        annotation = ""
        if labels[i]:
            annotation = f"slides/{slide_id}_mask.png"
            Image.fromarray(tumour.astype(np.uint8) * 255).save(out / annotation)
        return {"slide_id": slide_id, "path": slide.relative_to(out).as_posix(), "label": int(labels[i]),
                "split": splits[i], "annotation": annotation}

    # Threads: numpy and the JPEG encoder release the GIL (~1.6x on 2 cores); each slide has its own seed.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not macOS
    with ThreadPoolExecutor(max_workers=min(8, usable)) as pool:
        rows = list(pool.map(write_slide, range(n_slides)))
    manifest = out / "manifest.csv"
    partial = out / "manifest.csv.partial"
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "label", "split", "annotation"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, manifest)  # the manifest appears last, only once every slide is written
    return manifest


def damage_jpeg_tiles(src: str | Path, dst: str | Path, coords: np.ndarray, tile_size: int) -> list[int]:
    """Copy a slide to `dst` with the middle third of the level-0 JPEG tiles under these (x, y) tiles overwritten
    by noise: a valid TIFF with corrupt JPEG data, for fault tests. Returns the damaged TIFF tile indices."""
    import shutil

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        indices = sorted({(y // page.tilelength) * across + x // page.tilewidth
                          for x0, y0 in np.asarray(coords, dtype=np.int64)
                          for x in (x0, x0 + tile_size - 1) for y in (y0, y0 + tile_size - 1)})
        spans = [(int(page.dataoffsets[i]), int(page.databytecounts[i])) for i in indices]
    rng = np.random.default_rng(0)
    with open(dst, "r+b") as handle:
        for offset, count in spans:
            handle.seek(offset + count // 3)
            handle.write(rng.integers(0, 256, count // 3, dtype=np.uint8).tobytes())
    return indices
