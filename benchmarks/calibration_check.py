"""Are the calibrated calls what they claim? Normal slides the model never saw, and a planted anomaly.

Builds patchwork slides of one real IHC tissue (``slide.synthetic.patchwork_spec``: every slide shows the same
tissue, no two share a tile), extracts tiles from ``--train-slides`` of them with ``wsi-haloae tiles``, trains a
model with ``--val-fraction`` (whole slides held out for its calibration), optionally recalibrates it with
``wsi-haloae calibrate`` on ``--site-slides`` further normal slides, then runs the current ``run_infer`` on
``--test-slides`` new normal slides and one slide with a planted haemorrhage (``blood``: the tissue recoloured
dark red to pink, a kind the demo does not use), reads the tile scores from each store (tiles/score_mean) and
applies ``wsi_haloae.scoring`` with each calibration:

- normal slides: share of tiles called by Benjamini–Hochberg at --alpha, share with p <= alpha (uncorrected;
  about alpha or less when the p-values are calibrated), Kolmogorov–Smirnov statistic of the tile p-values
  against uniform, Simes p-value, verdict;
- planted slide: precision of the calls against the planted disc (a call is right when its tile overlaps the
  disc), recall over tiles at least 25 % inside it, tile AUROC of the raw score;
- the same figures for the per-slide rule (median + 3 MAD) side by side: the peer the calibration replaces.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_WORKDIR, base_parser, finish, print_table, save, start  # noqa: E402


def slide_figures(store: Path, cal, alpha: float, spec=None) -> dict:
    """Figures of one scored slide under both rules (``spec`` given: against its planted anomaly)."""
    from scipy.stats import kstest
    from sklearn.metrics import roc_auc_score

    from wsi_haloae.infer.writers import open_store, read_attrs
    from wsi_haloae.scoring import cell_area_mm2, slide_verdict
    from wsi_haloae.slide.synthetic import anomaly_mask

    g = open_store(store)
    attrs = read_attrs(store)
    scores = g["tiles/score_mean"][:].astype(np.float64)
    rc = g["tiles/rc"][:]
    shape = (attrs["tiles"]["n_rows"], attrs["tiles"]["n_cols"])
    mpp0 = attrs["slide"]["mpp"] or attrs["target_mpp"]
    area = cell_area_mm2(attrs["level0_tile"], mpp0)
    row: dict = {"slide": store.stem, "tiles": int(np.isfinite(scores).sum())}
    truth = overlap = None
    if spec is not None:
        xy = g["tiles/xy"][:]
        t = float(attrs["level0_tile"])
        frac = np.array([anomaly_mask(spec, int(x), int(y), 32, 32, downsample=t / 32).mean() for x, y in xy])
        truth, overlap = frac >= 0.25, frac > 0
        row["planted_tiles"] = int(truth.sum())
        row["auroc"] = float(roc_auc_score(truth, scores)) if truth.any() and (~truth).any() else None
    for rule in ("fdr", "mad"):
        v = slide_verdict(scores, rc[:, 0], rc[:, 1], shape, area, cal, alpha=alpha, rule=rule)
        k = v.anomalous_tiles
        row[f"{rule}_called"] = k
        row[f"{rule}_called_frac"] = v.anomalous_fraction
        row[f"{rule}_verdict"] = v.verdict
        if truth is not None:
            row[f"{rule}_precision"] = float((v.anomalous & overlap).sum() / k) if k else None
            row[f"{rule}_recall"] = float((v.anomalous & truth).sum() / truth.sum()) if truth.any() else None
        if rule == "fdr":
            p = v.pvalues[np.isfinite(v.pvalues)]
            row["p_le_alpha_frac"] = float((p <= alpha).mean())
            normal_p = p if truth is None else v.pvalues[np.isfinite(v.pvalues) & ~overlap]
            ks = kstest(normal_p, "uniform")
            row["ks"], row["ks_pvalue"] = float(ks.statistic), float(ks.pvalue)
            row["simes_p"] = v.simes_pvalue
            row["largest_region_mm2"] = v.largest_region_mm2
            row["_pvalues"] = normal_p.tolist()
    return row


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--train-slides", type=int, default=6)
    p.add_argument("--site-slides", type=int, default=4, help="Normal slides for `calibrate` (0: hold-out only).")
    p.add_argument("--test-slides", type=int, default=3)
    p.add_argument("--size", type=int, default=2048, help="Side of each slide in level-0 px (0.5 µm/px).")
    p.add_argument("--anomaly-radius", type=float, default=None, help="Planted disc radius, px (default 0.25 × size).")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--backbone-weights", default="random")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--samples-per-epoch", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.train_slides, args.site_slides, args.test_slides, args.size = 4, 1, 1, 1536
        args.epochs, args.samples_per_epoch = 1, 2
    res = start("calibration_check", args)
    t0 = time.perf_counter()

    from scipy.stats import kstest

    from wsi_haloae.calibrate import run_calibrate
    from wsi_haloae.config import CalibrateConfig, InferConfig, InferOptions, TilesConfig, TrainConfig
    from wsi_haloae.infer.engine import run_infer
    from wsi_haloae.model.checkpoint import load_model
    from wsi_haloae.scoring import Calibration
    from wsi_haloae.slide.synthetic import patchwork_spec, write_synthetic_slide
    from wsi_haloae.slide.tiles import run_tiles
    from wsi_haloae.train.trainer import run_train

    dev = args.device
    work = (args.workdir or DEFAULT_WORKDIR / "calibration_check") / f"s{args.size}"
    work.mkdir(parents=True, exist_ok=True)

    def tiles_of(prefix: str, seeds: range, folder: Path) -> Path:
        for seed in seeds:
            slide = work / f"{prefix}{seed}.tif"
            if not slide.is_file():
                write_synthetic_slide(slide, patchwork_spec(seed, args.size))
            run_tiles(TilesConfig(slide=slide, out=folder, mpp=0.5), progress=False)
        return folder

    tiles = tiles_of("train", range(100, 100 + args.train_slides), work / f"tiles-t{args.train_slides}")
    model = work / (f"model-{args.preset}-{Path(args.backbone_weights).stem}-t{args.train_slides}-v{args.val_fraction}"
                    f"-e{args.epochs}x{args.samples_per_epoch}x{args.batch_size}.safetensors")
    t1 = time.perf_counter()
    run_train(TrainConfig(tiles=tiles, out=model, preset=args.preset, epochs=args.epochs,
                          samples_per_epoch=args.samples_per_epoch, batch_size=args.batch_size,
                          backbone_weights=args.backbone_weights, device=dev, workers=0, seed=0,
                          val_fraction=args.val_fraction))
    res["train_s"] = round(time.perf_counter() - t1, 1)
    models = {"hold-out": model}
    if args.site_slides:
        site = tiles_of("site", range(400, 400 + args.site_slides), work / f"tiles-site{args.site_slides}")
        models["site"] = model.with_name(model.stem + f".site{args.site_slides}.safetensors")
        run_calibrate(CalibrateConfig(model=model, tiles=site, out=models["site"], device=dev, workers=0,
                                      progress=False))
    cals = {}
    for name, path in models.items():
        cal = Calibration.from_metadata(load_model(path).metadata)
        if cal is None:
            sys.exit(f"error: {path} has no calibration (too few held-out tiles); use more or larger slides")
        cals[name] = cal
        res.setdefault("calibrations", {})[name] = cal.summary()
        print(f"# {name}: {cal.line()}", flush=True)

    loaded = load_model(model, "cpu" if dev == "auto" else dev)
    radius = args.anomaly_radius or 0.25 * args.size
    jobs = [(f"normal{j}", patchwork_spec(200 + j, args.size)) for j in range(args.test_slides)]
    jobs.append(("planted", patchwork_spec(300, args.size, anomaly_radius=radius)))
    pooled: dict[str, list[float]] = {k: [] for k in cals}
    for name, spec in jobs:
        slide = work / f"{name}.tif"
        write_synthetic_slide(slide, spec)
        out = work / f"{name}.zarr"
        run_infer(InferConfig(slide=slide, model=model, out=out, overwrite=True,
                              options=InferOptions(workers=0, batch_size=16, device=dev, progress=False)),
                  loaded=loaded)
        for cname, cal in cals.items():
            row = {"calibration": cname, "n": cal.n, **slide_figures(out, cal, args.alpha,
                                                                     spec if spec.anomalies else None)}
            ps = row.pop("_pvalues")
            if not spec.anomalies:
                pooled[cname] += ps
            res["rows"].append(row)
        save(res, args)
    res["normal_pooled"] = {}
    for cname in cals:
        normal = [r for r in res["rows"] if "planted_tiles" not in r and r["calibration"] == cname]
        tiles_n = max(1, sum(r["tiles"] for r in normal))
        ps = np.array(pooled[cname])
        ks = kstest(ps, "uniform")
        res["normal_pooled"][cname] = {
            "tiles": len(ps), "fdr_called_frac": sum(r["fdr_called"] for r in normal) / tiles_n,
            "mad_called_frac": sum(r["mad_called"] for r in normal) / tiles_n,
            "p_le_alpha_frac": float((ps <= args.alpha).mean()), "ks": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
            "slides_called_fdr": sum(r["fdr_verdict"] == "anomalous" for r in normal),
            "slides_called_mad": sum(r["mad_verdict"] == "anomalous" for r in normal), "slides": len(normal),
        }
    print_table(res["rows"], ["calibration", "n", "slide", "tiles", "planted_tiles", "auroc", "fdr_called",
                              "fdr_precision", "fdr_recall", "fdr_verdict", "p_le_alpha_frac", "ks", "ks_pvalue",
                              "simes_p", "mad_called", "mad_precision", "mad_recall", "mad_verdict"])
    for cname, d in res["normal_pooled"].items():
        print(f"# normal slides pooled, {cname} calibration: {d}")
    finish(res, args, t0)


if __name__ == "__main__":
    main()
