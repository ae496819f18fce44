"""`python -m hnm_ray.demo --out DIR`: write the synthetic demo cohort (slides, tumour masks, manifest.csv)."""
from __future__ import annotations

import argparse
import time

from hnm_ray.config import JobConfig
from hnm_ray.slides.synthetic import make_demo_cohort


def main(argv: list[str] | None = None) -> None:
    """Parse flags, write the cohort and print where its manifest is."""
    parser = argparse.ArgumentParser(prog="python -m hnm_ray.demo", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--out", required=True, help="output folder (created if absent)")
    defaults = JobConfig()  # the cohort `python -m hnm_ray.train` makes when no manifest is given
    parser.add_argument("--slides", type=int, default=defaults.demo_slides,
                        help=f"number of slides, half of them with tumour (default: {defaults.demo_slides})")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files (default: 0)")
    parser.add_argument("--size", type=int, default=defaults.demo_size,
                        help=f"level-0 width in px at 0.5 um/px (default: {defaults.demo_size})")
    args = parser.parse_args(argv)
    if args.slides < 1 or args.size < 512:
        parser.error("--slides must be >= 1 and --size >= 512")
    start = time.perf_counter()
    manifest = make_demo_cohort(args.out, n_slides=args.slides, seed=args.seed, size=args.size)
    print(f"wrote {args.slides} slides in {time.perf_counter() - start:.1f} s; manifest: {manifest}")


if __name__ == "__main__":
    main()
