"""Features users already have: per-slide h5 files of TRIDENT, CLAM or STAMP into the feature store, and back out.

One h5 file a slide, its name (without `.h5`) the slide id (the store's name rules apply):
- trident: datasets `features` (N, D) and `coords` (N, 2) top-left corners in level-0 pixels; the tile footprint
  from the `coords` attributes `patch_size_level0` (or `patch_size` at `patch_level`).
- clam: the same datasets; `coords` attributes `patch_size` and `patch_level` when CLAM's patching wrote them,
  else pass `--patch-size`.
- stamp: datasets `feats` (N, D) and `coords` (N, 2) in micrometres, file attributes `extractor`, `unit`,
  `tile_size_um`; pass `--mpp` (the slides' level-0 microns per pixel) to turn micrometres into level-0 pixels.

Each slide becomes `<store>/<tag>/round=<r>/<slide>.parquet` with tile ids 0..N-1 in file order, truth -1, and the
source format, encoder and patch size in the file metadata. A malformed file is recorded in the store's
errors.jsonl and skipped; re-running skips imported slides. `--export DIR` writes a store as TRIDENT-style h5.

    python -m hnm_ray.import_features --format trident --h5-dir FEATS/ --store STORE --tag uni_v1
    python -m hnm_ray.import_features --format stamp --h5-dir FEATS/ --store STORE --tag uni2 --mpp 0.25
    python -m hnm_ray.import_features --export OUT/ --store STORE --tag uni_v1
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from hnm_ray.core import storage
from hnm_ray.run.cli import add_store_arguments, entry_point
from hnm_ray.run.cli import parser as cli_parser
from hnm_ray.core.errors import StoreError
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import name_problem

log = logging.getLogger("hnm_ray")


@dataclass(frozen=True)
class Layout:
    """Where a format keeps a slide's features and coordinates, and the unit of the coordinates."""

    features: str
    coords: str
    unit: str  # "px" (level-0 pixels) or "um"


FORMATS = {"trident": Layout("features", "coords", "px"), "clam": Layout("features", "coords", "px"),
           "stamp": Layout("feats", "coords", "um")}


@dataclass
class ImportedSlide:
    """One h5 file read and checked: features (N, D), level-0 top-left corners (N, 2), tile level and size."""

    features: np.ndarray
    coords: np.ndarray
    level: int
    size: int
    metadata: dict[str, Any]


@dataclass
class ImportSummary:
    """What an import did: slides written, skipped as already imported, and failed (recorded in errors.jsonl)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _attrs(node: Any) -> dict[str, Any]:
    """An h5 node's attributes as JSON-ready values."""
    out = {}
    for key, value in node.attrs.items():
        value = value.tolist() if isinstance(value, np.ndarray | np.generic) else value
        out[key] = value.decode() if isinstance(value, bytes) else value
    return out


def _dataset(h5: Any, path: Path, key: str, fix: str) -> np.ndarray:
    if key not in h5:
        raise StoreError(f"{path}: no dataset {key!r} (has {sorted(h5.keys())}); {fix}")
    return np.asarray(h5[key][()])


def read_h5(path: str | Path, fmt: str, mpp: float | None = None, patch_size: int | None = None) -> ImportedSlide:
    """Read and check one slide's h5 file of format `fmt` (StoreError naming the file and key when malformed)."""
    import h5py

    path, layout = Path(path), FORMATS[fmt]
    fix = f"is it a {fmt} feature file? Re-extract it or remove it from the folder"
    try:
        with h5py.File(path, "r") as h5:
            features = _dataset(h5, path, layout.features, fix)
            coords = _dataset(h5, path, layout.coords, fix)
            file_attrs, coord_attrs = _attrs(h5), _attrs(h5[layout.coords])
    except OSError as exc:
        raise StoreError(f"{path}: not a readable h5 file ({exc}); re-extract it or remove it from the folder") from exc
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise StoreError(f"{path}: dataset {layout.features!r} has shape {features.shape} and dtype {features.dtype}; "
                         "expected floats of shape (n_tiles, dim)")
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(features):
        raise StoreError(f"{path}: dataset {layout.coords!r} has shape {coords.shape}; expected ({len(features)}, 2), "
                         f"one (x, y) per row of {layout.features!r}")
    for key, values in ((layout.features, features), (layout.coords, coords)):
        if not np.isfinite(values).all():
            raise StoreError(f"{path}: dataset {key!r} contains NaN or inf; re-extract this slide")
    if len(features) == 0:
        raise StoreError(f"{path}: dataset {layout.features!r} has no tiles; remove the file (no tissue found?)")
    attrs = {**file_attrs, **coord_attrs}
    try:
        level, size, coords_px = _geometry(path, layout, attrs, coords, mpp, patch_size)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: a patch size / level attribute is not a number ({exc}); pass --patch-size, or "
                         "fix the file's attributes") from exc
    metadata = {"source_format": fmt, "source_file": path.name, "encoder": str(attrs.get("extractor", attrs.get(
        "encoder", ""))), "tile_size": size, "level": level, "mpp": mpp, "source_attrs": attrs}
    return ImportedSlide(features if features.dtype in (np.float16, np.float32) else features.astype(np.float32),
                         coords_px, level, size, metadata)


def _geometry(path: Path, layout: Layout, attrs: dict[str, Any], coords: np.ndarray, mpp: float | None,
              patch_size: int | None) -> tuple[int, int, np.ndarray]:
    """(level, tile size at that level, level-0 pixel corners) from a file's attributes and the user's flags."""
    if layout.unit == "um":
        if not mpp or mpp <= 0:
            raise StoreError(f"{path}: coordinates are in micrometres; pass --mpp (the slides' level-0 microns per "
                             "pixel, e.g. 0.25 at 40x) to turn them into level-0 pixels")
        size_um = attrs.get("tile_size_um")
        size = int(round(float(size_um) / mpp)) if size_um is not None else patch_size
        if size is None:
            raise StoreError(f"{path}: no attribute 'tile_size_um'; pass --patch-size (tile size in level-0 pixels)")
        return 0, size, np.rint(coords / mpp).astype(np.int64)
    if "patch_size_level0" in attrs:
        return 0, int(attrs["patch_size_level0"]), np.rint(coords).astype(np.int64)
    size = attrs.get("patch_size", patch_size)
    if size is None:
        raise StoreError(f"{path}: dataset 'coords' has no attribute 'patch_size_level0' or 'patch_size'; pass "
                         "--patch-size (the tile size in pixels at the patch level)")
    return int(attrs.get("patch_level", 0)), int(size), np.rint(coords).astype(np.int64)


def import_h5(files: list[Path], store: FeatureStore, fmt: str, mpp: float | None = None,
              patch_size: int | None = None) -> ImportSummary:
    """Import slide h5 files into `store`; a bad file is recorded in errors.jsonl and skipped, imported ones skipped."""
    if fmt not in FORMATS:
        raise StoreError(f"unknown format {fmt!r}; use one of {sorted(FORMATS)}")
    if FORMATS[fmt].unit == "um" and not (mpp and mpp > 0):
        raise StoreError(f"{fmt} coordinates are in micrometres; pass --mpp (the slides' level-0 microns per pixel, "
                         "e.g. 0.25 at 40x) to turn them into level-0 pixels")
    summary, done = ImportSummary(), store.completed()
    store.ensure_writable()
    for path in sorted(files):
        slide_id = Path(path).stem
        if slide_id in done:
            summary.skipped.append(slide_id)
            continue
        try:
            if reason := name_problem(slide_id):
                raise StoreError(f"{path}: slide id {slide_id!r} (the file name) {reason}; rename the file")
            slide = read_h5(path, fmt, mpp, patch_size)
            n = len(slide.features)
            tiles = pa.table({"tile_id": np.arange(n, dtype=np.int32), "x": slide.coords[:, 0], "y": slide.coords[:, 1],
                              "level": np.full(n, slide.level, np.int8), "size": np.full(n, slide.size, np.int16)})
            store.write_slide(slide_id, tiles, slide.features, metadata=slide.metadata)
        except StoreError as exc:
            log.warning("import: skipped %s", exc)
            store.record_error(slide_id, "import", str(exc))
            summary.failed[slide_id] = str(exc)
            continue
        summary.written.append(slide_id)
    log.info("import: %d slides written, %d already imported, %d failed%s", len(summary.written), len(summary.skipped),
             len(summary.failed), f" (see {store.errors_path})" if summary.failed else "")
    return summary


def export_trident(store: FeatureStore, out_dir: str | Path) -> list[Path]:
    """Write every slide of `store` as a TRIDENT-style h5 (`features`, `coords` level-0 px with patch attributes)."""
    import h5py

    out_dir = Path(out_dir)
    storage.refuse_links_out(out_dir, "--export")  # h5py writes through a path: no link may lead it elsewhere
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for slide_id in sorted(store.completed()):
        table = store.read_table(slide_id)
        embedding = table.column("embedding").combine_chunks()
        features = embedding.flatten().to_numpy(zero_copy_only=False).reshape(table.num_rows, embedding.type.list_size)
        coords = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.int64)
        level, size = int(table.column("level")[0].as_py()), int(table.column("size")[0].as_py())
        coord_attrs = {"patch_size": size, "patch_level": level, "name": slide_id, "overlap": 0}
        if level == 0:  # the level-0 footprint is known only for level-0 tiles (no downsample in the store)
            coord_attrs["patch_size_level0"] = size
        path = out_dir / f"{slide_id}.h5"
        temp = out_dir / f".{slide_id}.h5.tmp"
        with h5py.File(temp, "w") as h5:
            h5.create_dataset("features", data=features)
            h5.create_dataset("coords", data=coords)
            h5["coords"].attrs.update(coord_attrs)
            h5["features"].attrs.update({"name": slide_id, "encoder_tag": store.encoder_tag})
        temp.replace(path)
        written.append(path)
    log.info("export: wrote %d TRIDENT-style h5 files to %s", len(written), out_dir)
    return written


@entry_point
def main(argv: list[str] | None = None) -> int:
    """CLI: import a folder of h5 feature files into the store, or export the store as TRIDENT-style h5."""
    parser = cli_parser("python -m hnm_ray.import_features", __doc__)
    add_store_arguments(parser)
    parser.add_argument("--format", choices=sorted(FORMATS), help="layout of the h5 files to import")
    parser.add_argument("--h5-dir", help="folder of per-slide h5 files to import (<slide_id>.h5)")
    parser.add_argument("--mpp", type=float, help="level-0 microns per pixel of the slides (stamp: required)")
    parser.add_argument("--patch-size", type=int, help="tile size in pixels when the files do not record it")
    parser.add_argument("--export", metavar="DIR", help="write the store as TRIDENT-style h5 files into DIR instead")
    args = parser.parse_args(argv)
    store = FeatureStore(args.store, args.tag, round=args.round)
    if args.export:
        export_trident(store, args.export)
        return 0
    if not args.format or not args.h5_dir:
        parser.error("importing needs --format and --h5-dir (or pass --export DIR)")
    files = sorted(Path(args.h5_dir).glob("*.h5"))
    if not files:
        raise StoreError(f"no .h5 files in {args.h5_dir}; pass the folder holding one <slide_id>.h5 per slide")
    summary = import_h5(files, store, args.format, args.mpp, args.patch_size)
    print(json.dumps({"written": len(summary.written), "skipped": len(summary.skipped),
                      "failed": sorted(summary.failed)}))
    return 0 if not summary.failed else 2


if __name__ == "__main__":
    raise SystemExit(main())
