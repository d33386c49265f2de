"""``wsi-haloae demo``: the whole flow on its built-in slide (training capped at one step to stay fast)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from wsi_haloae.demo import demo_spec, run_demo
from wsi_haloae.infer import writers
from wsi_haloae.slide.synthetic import anomaly_mask


def test_demo_spec_plants_the_anomaly_in_the_right_island_only():
    spec = demo_spec()
    left, right = spec.islands
    (a,) = spec.anomalies
    assert (a.cx - right.cx) ** 2 + (a.cy - right.cy) ** 2 < (right.r - a.r) ** 2  # inside the right island
    assert (a.cx - left.cx) ** 2 + (a.cy - left.cy) ** 2 > (left.r + a.r) ** 2  # far from the left one
    assert anomaly_mask(spec, 0, 0, spec.width // 8, spec.height // 8, downsample=8).mean() > 0.02


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    res = run_demo(out, device="cpu", train_steps=1, calibration_stride=256)
    printed = capsys.readouterr().out
    # every output exists, is complete, and is named in the printed report with QuPath instructions
    assert writers.is_complete(out / "heatmap.zarr")
    for name in ("demo_slide.tif", "normal_slide.tif", "model.safetensors", "heatmap.ome.tif", "heatmap.rgb.ome.tif",
                 "heatmap_tiles.geojson", "heatmap.png", "normal_region.geojson", "demo_summary.json"):
        assert (out / name).is_file(), name
        if name.startswith("heatmap"):
            assert str(out / name) in printed
    assert "QuPath" in printed and "measurement maps" in printed.lower()
    assert res["backbone"] in ("imagenet", "random") and res["backbone"].upper() in printed.upper()
    # the training tiles come from the annotated normal island only: none touches the planted anomaly
    spec = demo_spec()
    with open(out / "train_tiles" / "tiles.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 10
    for r in rows:
        x, y, s = int(r["x"]), int(r["y"]), int(float(r["level0_size"]))
        assert not anomaly_mask(spec, x, y, s // 8, s // 8, downsample=8).any()
        assert x + s <= spec.islands[0].cx + spec.islands[0].r + 256
    # the verdict is computed from the ground truth and written down
    summary = json.loads((out / "demo_summary.json").read_text())
    c = summary["check"]
    assert c["anomalous_tiles"] >= 3 and c["tiles"] > c["anomalous_tiles"]
    assert isinstance(c["anomaly_scored_higher"], bool) and 0.0 <= c["auroc"] <= 1.0
    assert ("scored HIGHER" in printed) == c["anomaly_scored_higher"]
    if res["backbone"] == "random":
        # the offline default must find what it planted (tile AUROC 1.00 after the demo's 20 steps, docs/quickstart.md)
        assert c["anomaly_scored_higher"] and c["auroc"] >= 0.8, c
    g = writers.open_store(out / "heatmap.zarr")
    scores = g["tiles/score_mean"][:]
    assert np.isfinite(scores).all() and len(scores) == c["tiles"]
    # the model is calibrated on the normal slide's tiles (not its training tiles), and the verdict is printed
    from wsi_haloae.model.checkpoint import load_model

    meta = load_model(out / "model.safetensors").metadata
    n_cal = len(list((out / "calibration_tiles").glob("*.png")))
    assert meta["calibration"]["n"] == n_cal >= 20 and meta["calibration"]["provenance"]["source"] == "calibrate"
    assert meta["holdout"]["mode"] == "none" and res["calibration"]["n"] == n_cal
    attrs = writers.read_attrs(out / "heatmap.zarr")
    v = attrs["verdict"]
    assert attrs["calls"]["rule"] == "fdr" and attrs["calibration"]["n"] == n_cal
    assert f"Slide verdict: {v['verdict']} ({v['anomalous_tiles']} of {v['tissue_tiles']} tissue tiles" in printed
    assert c["classified_anomalous"] == v["anomalous_tiles"] == int(g["tiles/anomalous"][:].sum())
