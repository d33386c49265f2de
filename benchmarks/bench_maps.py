"""Maps (issue 12): how much of the tissue the map colours, and how many windows that costs.

Geometry only, no model: for each grid (whole tiles only, as before round 2; or with the partial
right/bottom strip as padded edge tiles), each tissue threshold and each overlap, the windows that would be
scored and the fraction of the slide's tissue-mask pixels that lie in one of them
(``slide.grid.scored_tissue_fraction``; unreadable tiles aside, this is the share of tissue the map colours,
since glass is NaN'd at map resolution). The end-to-end figures (scored fraction of a real run, the seam
measure of ``infer.seams`` per overlap and its throughput cost) are ``bench_seams.py``'s.

    python benchmarks/bench_maps.py [--quick] [--slide PATH] [--mpp 0.5] [--out results.json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main() -> None:
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--slide", type=Path, help="Default: CMU-1-Small-Region (real H&E), else the synthetic slide.")
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--min-tissue", default="0.5,0.25,0.1,0.05,0.01")
    p.add_argument("--overlaps", default="0,0.5,0.75")
    args = p.parse_args()
    t0 = time.perf_counter()
    result = _common.start("bench_maps", args)

    from wsi_haloae.slide.grid import build_grid, plan_windows, scored_tissue_fraction
    from wsi_haloae.slide.reader import SlideReader

    slide = args.slide or _common.shared_file(*_common.CMU_SMALL)
    if slide is None or args.quick:
        from wsi_haloae.slide.synthetic import write_synthetic_slide

        work = _common.DEFAULT_WORKDIR
        work.mkdir(parents=True, exist_ok=True)
        slide = work / "maps-synthetic.tif"
        if not slide.is_file():
            write_synthetic_slide(slide, width=2048, height=2048, mpp=0.5)
    reader = SlideReader(slide)
    result["slide"] = {"path": str(slide), "dimensions": list(reader.dimensions), "mpp": reader.mpp,
                       "bounds": list(reader.bounds)}
    thresholds = [float(v) for v in args.min_tissue.split(",")][: 2 if args.quick else None]
    overlaps = [float(v) for v in args.overlaps.split(",")][: 2 if args.quick else None]
    for edges in (False, True):
        for thr in thresholds:
            grid = build_grid(reader, args.mpp, min_tissue=thr, cover_edges=edges)
            for ov in overlaps:
                win = plan_windows(grid, ov)
                result["rows"].append({
                    "grid": "whole + edge tiles" if edges else "whole tiles only",
                    "cells": f"{grid.n_rows}x{grid.n_cols}", "min_tissue": thr, "overlap": ov,
                    "grid_tiles": len(grid), "windows": len(win),
                    "tissue_scored": round(scored_tissue_fraction(grid, win), 4),
                })
            _common.save(result, args)
    _common.print_table(result["rows"], ["grid", "cells", "min_tissue", "overlap", "grid_tiles", "windows",
                                         "tissue_scored"])
    _common.finish(result, args, t0)


if __name__ == "__main__":
    main()
