"""Calibrated calls end to end through ``run_infer`` (issue 10): p-values, BH calls, verdict, colour scale, cohort.

The model is test_infer's probe (anomaly map = the tile's darkness), so every figure is known from the slide's
pixels, without training. Its calibration is made the way ``calibrate`` makes one: the probe's tile scores and
map pixels on five normal patchwork slides it then never scores again. The test slides are a new normal slide
and one with a planted dark stain (``slide.synthetic``), which the probe sees as more unusual than any
calibration tile. The statistics are checked against direct reference formulas written out here.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from test_infer import cfg_for, probe
from wsi_haloae.config import InferOptions
from wsi_haloae.errors import BadInputError
from wsi_haloae.infer.engine import run_infer
from wsi_haloae.infer.writers import map_levels, open_store, read_attrs
from wsi_haloae.scoring import Calibration
from wsi_haloae.slide.synthetic import SyntheticSlideSpec, anomaly_mask, patchwork_spec, write_synthetic_slide

SIZE = 1536  # 32 tissue tiles of 256 px at 0.5 µm/px
ALPHA = 0.05


def _probe(sha: str, calibration: Calibration | None = None):
    """The probe model under its own sha256 (the missing-calibration warning is once per model and process)."""
    m = probe()
    m.sha256 = sha * 64
    if calibration is not None:
        m.metadata["calibration"] = calibration.to_dict()
    return m


def _tile_fraction(spec: SyntheticSlideSpec, xy: np.ndarray, tile: float) -> np.ndarray:
    return np.array([anomaly_mask(spec, int(x), int(y), 32, 32, downsample=tile / 32).mean() for x, y in xy])


def _bh_reference(p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg written out over the tested tiles (finite p): reject the k smallest,
    k = max{i : p_(i) <= i alpha / m}."""
    idx = np.flatnonzero(np.isfinite(p))
    m = len(idx)
    order = idx[np.argsort(p[idx], kind="stable")]
    ok = [i + 1 for i in range(m) if p[order[i]] <= (i + 1) * alpha / m]
    out = np.zeros(len(p), bool)
    if ok:
        out[order[: max(ok)]] = True
    return out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(calibration, {name: (store, spec, result)}) for a new normal slide and a planted one."""
    work = tmp_path_factory.mktemp("calls")
    scores, pixels = [], []
    for seed in range(1, 6):
        slide = write_synthetic_slide(work / f"cal{seed}.tif", patchwork_spec(seed, SIZE))
        out = work / f"cal{seed}.zarr"
        run_infer(cfg_for(slide, work, out=out), loaded=_probe("c"))
        g = open_store(out)
        s, t = g["tiles/score_mean"][:], g["tiles/tissue"][:]
        scores.append(s[np.isfinite(s) & (t >= 0.5)])  # tiles like `wsi-haloae tiles` keeps (>= 0.5 tissue)
        level0 = map_levels(g)[0][:]
        pixels.append(level0[np.isfinite(level0)])
    cal = Calibration.from_scores(np.concatenate(scores), np.concatenate(pixels),
                                  {"source": "calibrate", "tiles": "five normal patchwork slides"})
    model = _probe("d", cal)
    runs = {}
    for name, spec in (("normal", patchwork_spec(20, SIZE)),
                       ("planted", patchwork_spec(21, SIZE, anomaly_radius=0.25 * SIZE, anomaly_kind="stain"))):
        slide = write_synthetic_slide(work / f"{name}.tif", spec)
        out = work / f"{name}.zarr"
        res = run_infer(cfg_for(slide, work, out=out, geojson=work / f"{name}.geojson",
                                preview=work / f"{name}.png"), loaded=model)
        runs[name] = (out, spec, res)
    return cal, runs, model, work


def test_pvalues_and_bh_calls_end_to_end_on_a_planted_anomaly(calibrated):
    cal, runs, _, _ = calibrated
    out, spec, res = runs["planted"]
    g, a = open_store(out), read_attrs(out)
    s, p, called = g["tiles/score_mean"][:], g["tiles/pvalue"][:], g["tiles/anomalous"][:]
    tested = g["tiles/tissue"][:] >= 0.5  # edge tiles with less tissue are mapped, not tested
    assert (~tested).sum() == a["verdict"]["untested_low_tissue"] >= 1 and np.isnan(p[~tested]).all()
    # the conformal p-value, written out: (1 + #{calibration scores >= s}) / (n + 1)
    ref = (1 + (cal.scores[None, :] >= s[:, None].astype(np.float64)).sum(1)) / (cal.n + 1)
    np.testing.assert_allclose(p[tested], ref[tested].astype(np.float32), rtol=1e-6)
    assert cal.n >= 100 and np.nanmin(p) == pytest.approx(1 / (cal.n + 1))  # 5 slides of about 25 tiles
    np.testing.assert_array_equal(called, _bh_reference(p.astype(np.float64), ALPHA))
    frac = _tile_fraction(spec, g["tiles/xy"][:], float(a["level0_tile"]))
    k = int(called.sum())
    assert k >= 4  # BH at 0.05 with m = 24 tested tiles and n = 120 needs >= 4 tiles at p = 1/121
    # the calls concentrate on the stain: 7 of this slide's 8 calls touch it (BH bounds the expected share of
    # false calls over slides, not each slide's; the darkness probe finds one dark normal tile as unusual)
    assert (frac[called] > 0).mean() >= 0.85
    assert called[frac >= 0.5].mean() >= 0.5
    # attributes: the rule, its level, the calibration's provenance and the verdict
    assert a["calls"] == {**a["calls"], "rule": "fdr", "requested": "fdr", "alpha": ALPHA, "fallback": False,
                          "anomalous_tiles": k}
    assert a["calls"]["pvalue_cutoff"] == pytest.approx(float(p[called].max()))
    assert a["calibration"]["n"] == cal.n and a["calibration"]["source"] == "calibrate"
    v = a["verdict"]
    m = int(tested.sum())
    simes = min(m * q / i for i, q in enumerate(np.sort(p[tested].astype(np.float64)), start=1))
    assert v["verdict"] == "anomalous" and v["tissue_tiles"] == m and v["anomalous_tiles"] == k
    assert v["anomalous_fraction"] == pytest.approx(k / m)
    tile_mm2 = (256 * 0.5 / 1000) ** 2
    assert v["anomalous_area_mm2"] == pytest.approx(k * tile_mm2)
    assert tile_mm2 <= v["largest_region_mm2"] <= v["anomalous_area_mm2"]
    assert v["simes_pvalue"] == pytest.approx(simes) and simes <= ALPHA
    assert a["summary"]["verdict"] == "anomalous" and a["summary"]["anomalous_tiles"] == k
    assert a["summary"]["simes_pvalue"] == pytest.approx(simes)
    # the result and its one line
    assert res.verdict["verdict"] == "anomalous"
    assert f"verdict: anomalous ({k} of {m} tissue tiles anomalous, {k * tile_mm2:.3g} mm²" in res.line()
    # GeoJSON: p-value measurement per tile, Anomalous = the store's calls, the rule in the description
    gj = json.loads(Path(res.outputs["geojson"]).read_text())
    assert "Benjamini-Hochberg at FDR 0.05" in gj["description"] and f"{cal.n} normal tiles" in gj["description"]
    assert gj["properties"]["verdict"]["verdict"] == "anomalous" and gj["properties"]["calls"]["rule"] == "fdr"
    by_name = {f["properties"]["name"]: f["properties"] for f in gj["features"]}
    rc = g["tiles/rc"][:]
    for i, (r, c) in enumerate(rc):
        props = by_name[f"tile r{r} c{c}"]
        if tested[i]:
            assert props["measurements"]["anomaly_pvalue"] == pytest.approx(float(p[i]))
        else:  # no valid p-value: none written
            assert "anomaly_pvalue" not in props["measurements"]
        assert ("classification" in props) == bool(called[i])


def test_a_new_normal_slide_is_normal_and_the_colour_scale_is_the_calibrations(calibrated):
    cal, runs, _, _ = calibrated
    out, _, res = runs["normal"]
    a = read_attrs(out)
    p = open_store(out)["tiles/pvalue"][:]
    assert a["verdict"]["verdict"] == "normal" and a["verdict"]["anomalous_tiles"] == 0
    assert not open_store(out)["tiles/anomalous"][:].any()
    assert a["verdict"]["simes_pvalue"] > ALPHA and np.nanmin(p) > 1 / (cal.n + 1)  # none beyond every calibration tile
    assert f"verdict: normal (0 of {a['verdict']['tissue_tiles']} tissue tiles anomalous" in res.line()
    # one colour scale: the same range on both slides, the calibration's normal-pixel quantiles 0.5 .. 0.999
    planted = read_attrs(runs["planted"][0])
    assert a["display_range"] == planted["display_range"] == list(cal.display_range)
    assert a["display_range"] == [cal.pixel_quantiles[0.5], cal.pixel_quantiles[0.999]]
    assert a["display_range_source"].startswith("calibration")
    assert Path(res.outputs["preview"]).stat().st_size > 0


def test_threshold_mad_keeps_the_per_slide_rule(calibrated):
    cal, runs, model, work = calibrated
    out, spec, _ = runs["planted"]
    slide = work / "planted.tif"
    cfg = cfg_for(slide, work, out=work / "mad.zarr", threshold="mad")
    res = run_infer(cfg, loaded=model)
    g, a = open_store(cfg.out), read_attrs(cfg.out)
    s = g["tiles/score_mean"][:].astype(np.float64)
    med = np.median(s)
    thr = med + 3 * 1.4826 * np.median(np.abs(s - med))
    np.testing.assert_array_equal(g["tiles/anomalous"][:], s > thr)
    assert a["calls"]["rule"] == "mad" and a["calls"]["alpha"] is None and not a["calls"]["fallback"]
    assert a["calls"]["score_threshold"] == pytest.approx(thr)
    assert a["verdict"]["rule"] == "mad" and a["verdict"]["anomalous_tiles"] == int((s > thr).sum())
    # the calibration still gives p-values (tested tiles only) and the colour scale; every tile takes part in mad
    np.testing.assert_array_equal(g["tiles/pvalue"][:], open_store(out)["tiles/pvalue"][:])
    assert a["verdict"]["tissue_tiles"] == len(s)
    assert a["display_range"] == list(cal.display_range)
    assert "per-slide MAD rule, uncalibrated" in res.line()


def test_a_model_without_calibration_falls_back_with_one_warning(tmp_path, caplog):
    slides = [write_synthetic_slide(tmp_path / f"s{i}.tif", patchwork_spec(30 + i, 1024)) for i in range(2)]
    model = _probe("e")
    with caplog.at_level(logging.WARNING):
        results = [run_infer(cfg_for(s, tmp_path, out=tmp_path / f"s{i}.zarr", threshold="fdr"), loaded=model)
                   for i, s in enumerate(slides)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # once, not once per slide
    assert "has no calibration" in warnings[0] and "wsi-haloae calibrate" in warnings[0]
    for i, res in enumerate(results):
        g, a = open_store(res.out), read_attrs(res.out)
        assert a["calls"]["rule"] == "mad" and a["calls"]["requested"] == "fdr" and a["calls"]["fallback"]
        assert a["calibration"] is None and "pvalue" not in g["tiles"]
        assert a["verdict"]["simes_pvalue"] is None
        s = g["tiles/score_mean"][:]
        np.testing.assert_array_equal(g["tiles/anomalous"][:], s > a["threshold"]["value"])
        # per-slide colour scale as before: 0 .. the 99th percentile of the tile maxima
        mx = g["tiles/score_max"][:]
        assert a["display_range"] == [0.0, pytest.approx(float(np.quantile(mx[np.isfinite(mx)], 0.99)))]
        assert a["display_range_source"].startswith("this slide")


def test_no_tissue_slide_has_the_verdict_no_tissue(calibrated, tmp_path):
    _, _, model, _ = calibrated
    slide = write_synthetic_slide(tmp_path / "glass.tif", SyntheticSlideSpec(width=1100, height=700, mpp=0.5, islands=()))
    res = run_infer(cfg_for(slide, tmp_path, out=tmp_path / "g.zarr", preview=tmp_path / "g.png"), loaded=model)
    a = read_attrs(res.out)
    assert res.status == "no tissue" and a["verdict"]["verdict"] == "no tissue"
    assert a["verdict"]["tissue_tiles"] == 0 and a["verdict"]["simes_pvalue"] is None
    assert a["summary"]["verdict"] == "no tissue" and res.verdict["verdict"] == "no tissue"


def test_fdr_option_is_checked():
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(BadInputError, match="--fdr"):
            InferOptions(fdr=bad)
    with pytest.raises(BadInputError, match="--threshold"):
        InferOptions(threshold="otsu")
    assert replace(InferOptions(), fdr=0.1).fdr == 0.1


def test_cohort_tables_and_page_carry_the_verdict(calibrated, tmp_path):
    """The cohort row of a slide is its store's ``summary``; the page sorts anomalous first, then by p-value."""
    from wsi_haloae.cohort.report import COLUMNS, write_reports
    from wsi_haloae.cohort.worker import slide_row

    cal, runs, _, _ = calibrated
    rows = [{"id": "failed-one", "path": "/x", "status": "failed", "error": "cannot open"}]
    for name, (out, _, _) in runs.items():
        rows.append({"id": name, "path": str(out), "status": "done", **slide_row(read_attrs(out))})
    meta = {"threshold": "fdr", "fdr": ALPHA, "calibration": cal.summary()}
    write_reports(tmp_path, rows, meta)
    with open(tmp_path / "cohort.csv", newline="") as f:
        got = {r["id"]: r for r in csv.DictReader(f)}
    for col in ("verdict", "anomalous_area_mm2", "largest_region_mm2", "simes_pvalue", "anomalous_fraction", "rule"):
        assert col in COLUMNS
    planted = read_attrs(runs["planted"][0])["verdict"]
    assert got["planted"]["verdict"] == "anomalous" and got["normal"]["verdict"] == "normal"
    assert float(got["planted"]["anomalous_area_mm2"]) == pytest.approx(planted["anomalous_area_mm2"], rel=1e-5)
    assert float(got["planted"]["simes_pvalue"]) == pytest.approx(planted["simes_pvalue"], rel=1e-5)
    assert got["failed-one"]["verdict"] == "" and got["normal"]["rule"] == "fdr"
    js = {r["id"]: r for r in json.loads((tmp_path / "cohort.json").read_text())["slides"]}
    assert js["planted"]["verdict"] == "anomalous" and js["planted"]["largest_region_mm2"] == planted["largest_region_mm2"]
    page = (tmp_path / "index.html").read_text()
    # anomalous first, then normal, then the slide without a verdict
    assert page.index('data-v="planted"') < page.index('data-v="normal"') < page.index('data-v="failed-one"')
    assert f"{planted['anomalous_area_mm2']:.3g} mm²" in page and ">anomalous<" in page
    assert "score max (raw)" in page
    lo, hi = cal.display_range
    assert f"one scale for every slide ({lo:.3g} to {hi:.3g}" in page


def test_a_complete_store_keeps_its_calls_and_says_so(calibrated, caplog):
    _, runs, model, work = calibrated
    out, _, _ = runs["planted"]
    before = read_attrs(out)["verdict"]
    cfg = cfg_for(work / "planted.tif", work, out=out)
    with caplog.at_level(logging.WARNING):
        same = run_infer(cfg, loaded=model)
        other = run_infer(replace(cfg, options=replace(cfg.options, fdr=0.1)), loaded=model)
    assert same.status == other.status == "skipped" and other.verdict == before
    assert "verdict: anomalous" in other.line()
    warned = [r.getMessage() for r in caplog.records if "its calls are kept" in r.getMessage()]
    assert len(warned) == 1 and "--threshold fdr --fdr 0.05" in warned[0] and "--fdr 0.1" in warned[0]


def test_cohort_page_says_whose_colour_scale_and_rule(tmp_path):
    from wsi_haloae.cohort.report import to_html

    rows = [{"id": "a", "path": "/a", "status": "done", "verdict": "normal"}]
    cal = {"n": 1234, "display_range": [0.2, 11.6]}
    assert "has no calibration: each preview has its own colour scale" in to_html(rows, tmp_path, "t", {"calibration": None})
    fdr = to_html(rows, tmp_path, "t", {"calibration": cal, "threshold": "fdr", "fdr": 0.1})
    assert "one scale for every slide (0.2 to 11.6" in fdr and "1,234 normal tiles" in fdr and "FDR 0.1 on p-values" in fdr
    mad = to_html(rows, tmp_path, "t", {"calibration": cal, "threshold": "mad", "fdr": 0.05})
    assert "median + 3 MAD rule (--threshold mad)" in mad and "Benjamini" not in mad


def test_other_calls_names_how_stored_calls_differ_from_the_asked_ones():
    from wsi_haloae.infer.calls import other_calls

    fdr05 = {"requested": "fdr", "fdr": 0.05, "rule": "fdr"}
    assert other_calls(fdr05, "fdr", 0.05) is None
    assert other_calls(None, "fdr", 0.1) is None  # a store from before calls: nothing to compare
    assert other_calls(fdr05, "fdr", 0.1) == "made at --threshold fdr --fdr 0.05, asked --threshold fdr --fdr 0.1"
    assert other_calls(fdr05, "mad", 0.05) == "made at --threshold fdr --fdr 0.05, asked --threshold mad"
    mad = {"requested": "mad", "fdr": 0.05, "rule": "mad"}
    assert other_calls(mad, "mad", 0.2) is None  # --fdr means nothing to the mad rule
    # an uncalibrated model's fallback to mad is not a difference: the same request makes the same calls
    assert other_calls({"requested": "fdr", "fdr": 0.05, "rule": "mad", "fallback": True}, "fdr", 0.05) is None


def test_cohort_page_names_slides_that_keep_other_calls(tmp_path):
    from wsi_haloae.cohort.report import to_html

    rows = [{"id": "a", "path": "/a", "status": "skipped", "verdict": "normal"}]
    cal = {"n": 1234, "display_range": [0.2, 11.6]}
    plain = to_html(rows, tmp_path, "t", {"calibration": cal, "threshold": "fdr", "fdr": 0.1, "kept_calls": {}})
    assert "Not so for" not in plain
    kept = to_html(rows, tmp_path, "t", {"calibration": cal, "threshold": "fdr", "fdr": 0.1,
                                         "kept_calls": {"a": "made at --threshold fdr --fdr 0.05, asked --threshold fdr --fdr 0.1"}})
    assert "Not so for 1 slide(s) complete from an earlier run" in kept and "a: made at --threshold fdr --fdr 0.05" in kept
