"""Colour QC of every slide in `infer` and `cohort` (issue 11 item 3): attributes, summary, line, warning, rows.

Inference here uses the probe model of test_infer.py (its map is the tile's darkness, so runs are fast) with
or without a stain reference, and, for the cohort and the model-file path, a tiny HaloAE model file. The real
slides are the Aperio SVS of CMU-1-Small-Region and its DICOM copy that OpenSlide decodes in false colours
(../shared/data; skipped when absent), read at 2 µm/px so that a run scores a handful of tiles.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_infer import ProbeModel, cfg_for
from wsi_haloae.infer import writers
from wsi_haloae.infer.engine import InferResult, run_infer
from wsi_haloae.model.checkpoint import LoadedModel
from wsi_haloae.model.stain import StainNormalizer, fit_reference
from wsi_haloae.slide.colour import WARNING
from wsi_haloae.slide.reader import SlideReader

SVS = ("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")
DICOM = ("dicom-wsi-sample", "cmu-1-small-region", "level-0-frames-0-30.dcm")
COARSE = 2.0  # µm/px: CMU-1-Small-Region is 5-9 tiles at this resolution


def tiles_of(path: Path, n: int = 12, mpp: float | None = None) -> torch.Tensor:
    """``n`` tissue tiles of a slide, spread over it, as (n, 3, 256, 256) RGB [0, 1] (a model's training tiles)."""
    from wsi_haloae.slide.grid import build_grid

    reader = SlideReader(path)
    mpp = mpp or reader.mpp
    grid = build_grid(reader, mpp, 256, min_tissue=0.5)
    pick = np.linspace(0, len(grid.xs) - 1, min(n, len(grid.xs))).astype(int)
    tiles = np.stack([reader.read_tile(int(grid.xs[i]), int(grid.ys[i]), 256, mpp) for i in pick])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255


class StainedProbe(ProbeModel):
    """The probe with a stain normaliser, as HaloAE carries it (``model.stain``)."""

    def __init__(self, reference=None):
        super().__init__()
        self.stain = StainNormalizer()
        if reference is not None:
            self.stain.set_reference("macenko", reference)


def loaded(model: torch.nn.Module, mpp: float = COARSE) -> LoadedModel:
    return LoadedModel(model=model, mean_map=torch.zeros(64, 64), metadata={"mpp": mpp}, sha256="1" * 64)


@pytest.fixture(scope="module")
def cmu_reference():
    """The reference a model trained on CMU-1 tiles carries (fitted by the trainer's own function)."""
    from conftest import shared_path

    return fit_reference([tiles_of(shared_path(*SVS))])


def colour_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


# ------------------------------------------------------------------------------------------------ real slides
def test_cmu1_svs_is_ok_and_its_false_colour_dicom_copy_is_flagged_but_scored(shared, cmu_reference, tmp_path, caplog):
    model = loaded(StainedProbe(cmu_reference))
    caplog.set_level(logging.INFO)
    svs = run_infer(cfg_for(shared(*SVS), tmp_path, out=tmp_path / "svs.zarr"), loaded=model)
    attrs = writers.read_attrs(tmp_path / "svs.zarr")
    qc = attrs["colour_qc"]
    assert qc["status"] == "ok" and qc["reason"] is None and qc["reference"] == "model"
    assert "fitted on its training tiles" in qc["compared_with"]
    assert 0 <= qc["stain_distance"] < 15 and qc["stain_distance"] == max(qc["hematoxylin_angle"], qc["eosin_angle"])
    np.testing.assert_allclose(np.array([qc["reference_vectors"]["hematoxylin"], qc["reference_vectors"]["eosin"]]).T,
                               cmu_reference.stain_matrix, atol=1e-4)  # compared with the model's own reference
    assert attrs["summary"]["colour_qc"] == "ok" and attrs["summary"]["stain_distance"] == qc["stain_distance"]
    assert svs.colour_qc == qc and svs.summary["colour_qc"] == "ok"
    assert svs.line().endswith(f"; colours ok (stain distance {qc['stain_distance']:.0f}°)")
    assert colour_warnings(caplog) == []

    caplog.clear()
    dicom = run_infer(cfg_for(shared(*DICOM), tmp_path, out=tmp_path / "dicom.zarr"), loaded=model)
    qc = writers.read_attrs(tmp_path / "dicom.zarr")["colour_qc"]
    assert qc["status"] == "unusual" and "false colours" in qc["reason"] and qc["reference"] == "model"
    # flagged, not refused: the slide is scored and its store complete
    assert dicom.status == "done" and dicom.tiles_tissue > 0 and writers.is_complete(tmp_path / "dicom.zarr")
    assert dicom.summary["colour_qc"] == "unusual" and dicom.summary["colour_reason"] == qc["reason"]
    assert f"COLOURS UNUSUAL: {qc['reason']}" in dicom.line()
    warned = colour_warnings(caplog)
    assert len(warned) == 1 and "\n" not in warned[0] and qc["reason"] in warned[0] and str(shared(*DICOM)) in warned[0]
    # the same figures in the JSON form of the result (what cohort workers and --json users read)
    d = json.loads(json.dumps(dicom.to_dict()))
    assert d["colour_qc"]["status"] == "unusual" and d["summary"]["colour_qc"] == "unusual"


@pytest.mark.parametrize("model", [ProbeModel(), StainedProbe(None)], ids=["no stain module", "no reference"])
def test_a_model_without_stain_reference_still_gets_the_brightfield_checks(shared, tmp_path, caplog, model):
    caplog.set_level(logging.INFO)
    run_infer(cfg_for(shared(*DICOM), tmp_path, out=tmp_path / "dicom.zarr"), loaded=loaded(model))
    qc = writers.read_attrs(tmp_path / "dicom.zarr")["colour_qc"]
    assert qc["status"] == "unusual" and "false colours" in qc["reason"]
    assert qc["reference"] == "none" and qc["compared_with"].startswith("nothing: the model has no stain reference")
    assert len(colour_warnings(caplog)) == 1
    svs = run_infer(cfg_for(shared(*SVS), tmp_path, out=tmp_path / "svs.zarr"), loaded=loaded(model))
    qc = svs.colour_qc
    assert qc["status"] == "ok" and qc["reference"] == "none" and qc["reference_vectors"] is None
    assert qc["stain_distance"] is None and qc["hematoxylin_angle"] is None  # compared with nothing
    assert qc["stain_vectors"] is not None and qc["stained_pixels"] > 100  # but estimated and recorded
    assert svs.line().endswith("; colours ok (brightfield checks only)")


# ------------------------------------------------------------------------------------------ synthetic slides
def _copy(slide: Path, out: Path, recolour) -> Path:
    """A recoloured flat TIFF of a synthetic slide's level 0 (tifffile; 0.5 µm/px in its resolution tags)."""
    import tifffile

    rgb = recolour(SlideReader(slide).read_tile(0, 0, 2048, 0.5))
    tifffile.imwrite(out, rgb, photometric="rgb", tile=(256, 256), compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    return out


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.repeat((rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)[..., None], 3, axis=2)


def other_stain(rgb: np.ndarray) -> np.ndarray:
    """Colour channels permuted: the same tissue in other stain colours (near-grey glass stays near grey)."""
    return np.ascontiguousarray(rgb[..., [2, 0, 1]])


def test_synthetic_slide_ok_against_its_own_reference_other_stains_and_grey_flagged(synthetic_slide, tmp_path,
                                                                                     caplog):
    """The synthetic slides are IHC (hematoxylin + DAB): ok for a model trained on them; the same tissue in
    other colours is flagged and still scored; a grey copy is flagged (and has no tissue for the detector)."""
    model = loaded(StainedProbe(fit_reference([tiles_of(synthetic_slide, mpp=0.5)])), mpp=1.0)
    caplog.set_level(logging.INFO)
    ok = run_infer(cfg_for(synthetic_slide, tmp_path, out=tmp_path / "s.zarr"), loaded=model)
    assert ok.colour_qc["status"] == "ok" and ok.colour_qc["stain_distance"] < 5
    assert colour_warnings(caplog) == []
    turned = run_infer(cfg_for(_copy(synthetic_slide, tmp_path / "turned.tif", other_stain), tmp_path,
                               out=tmp_path / "t.zarr"), loaded=model)
    qc = turned.colour_qc
    assert qc["status"] == "unusual" and "from the training stain" in qc["reason"] and qc["stain_distance"] > 20
    assert turned.status == "done" and turned.tiles_tissue > 0  # flagged, and scored all the same
    assert len(colour_warnings(caplog)) == 1
    g = run_infer(cfg_for(_copy(synthetic_slide, tmp_path / "grey.tif", grey), tmp_path, out=tmp_path / "g.zarr"),
                  loaded=model)
    assert g.colour_qc["status"] == "unusual" and "grey-scale" in g.colour_qc["reason"]
    # no tissue for the detector either: its one warning is "no tissue found"; the line gives both verdicts
    assert g.status == "no tissue" and len(colour_warnings(caplog)) == 1
    assert "no tissue (" in g.line() and g.line().endswith(f"; COLOURS UNUSUAL: {g.colour_qc['reason']}")
    # a rerun that finds the store complete reports the recorded verdict again
    again = run_infer(cfg_for(tmp_path / "turned.tif", tmp_path, out=tmp_path / "t.zarr"), loaded=model)
    assert again.status == "skipped" and f"COLOURS UNUSUAL: {qc['reason']}" in again.line()


# ----------------------------------------------------------------------------------------------------- cohort
def test_cohort_table_and_page_show_the_colour_qc(synthetic_slide, tmp_path):
    """A real local cohort with a tiny HaloAE model file whose stain reference was fitted on the synthetic
    tissue: the synthetic slide is ok with its stain distance, a copy in other colours unusual, in cohort.csv,
    cohort.json, the page and the console."""
    from wsi_haloae.model import build_model
    from wsi_haloae.model.checkpoint import save_model

    net = build_model("tiny", backbone_weights="random", seed=0)
    net.stain.set_reference("macenko", fit_reference([tiles_of(synthetic_slide, mpp=0.5)]))
    model = save_model(tmp_path / "m.safetensors", net, torch.zeros(64, 64), {"mpp": 2.0})
    turned = _copy(synthetic_slide, tmp_path / "turned.tif", other_stain)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide,id\n{synthetic_slide},syn\n{turned},turned\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "wsi_haloae.cli", "cohort", str(manifest), "--model", str(model),
                        "--out", str(out), "--jobs", "1", "--device", "cpu", "--infer-workers", "0", "--batch-size",
                        "8", "--no-tiff", "--no-geojson"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with open(out / "cohort.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert {"colour_qc", "stain_distance", "colour_reason"} <= set(rows["syn"])
    assert rows["syn"]["colour_qc"] == "ok" and 0 <= float(rows["syn"]["stain_distance"]) < 5
    assert rows["syn"]["colour_reason"] == ""
    reason = rows["turned"]["colour_reason"]
    assert rows["turned"]["colour_qc"] == "unusual" and "from the training stain" in reason
    assert float(rows["turned"]["stain_distance"]) > 20 and rows["turned"]["status"] == "done"
    js = {s["id"]: s for s in json.loads((out / "cohort.json").read_text())["slides"]}
    assert js["turned"]["colour_qc"] == "unusual" and isinstance(js["syn"]["stain_distance"], float)
    page = (out / "index.html").read_text()
    assert 'class="colour-unusual"' in page and "1 slide(s) with colours unlike the training slides" in page
    assert page.count("&#9888; unusual colours: ") == 1 and "ok (" in page
    assert "cohort: 1 slide(s) with colours unlike the training slides" in p.stderr and "): turned" in p.stderr
    assert f"turned: {WARNING} ({reason})" in p.stderr
    # a rerun skips both and still shows the verdicts, read from the stores
    p = subprocess.run([sys.executable, "-m", "wsi_haloae.cli", "cohort", str(manifest), "--model", str(model),
                        "--out", str(out), "--device", "cpu", "--no-tiff", "--no-geojson"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    with open(out / "cohort.csv", newline="") as f:
        again = {r["id"]: r for r in csv.DictReader(f)}
    assert {k: (r["status"], r["colour_qc"]) for k, r in again.items()} == {"syn": ("skipped", "ok"),
                                                                           "turned": ("skipped", "unusual")}


def test_infer_applies_the_model_files_stain_normaliser_to_every_tile(synthetic_slide, tmp_path, monkeypatch):
    """The normaliser lives inside the model, so a model file read by infer normalises every scored tile."""
    from wsi_haloae.model import build_model
    from wsi_haloae.model.checkpoint import save_model

    net = build_model("tiny", backbone_weights="random", seed=0)
    net.stain.set_reference("macenko", fit_reference([tiles_of(synthetic_slide, n=4, mpp=0.5)]))
    path = save_model(tmp_path / "m.safetensors", net, torch.zeros(64, 64), {"mpp": 2.0})
    seen: list[tuple[str, int]] = []
    forward = StainNormalizer.forward

    def spy(self, x):
        if x.device.type != "meta":  # the batch-size probe runs the model on the meta device: no tile there
            seen.append((self.method, int(x.shape[0])))
        return forward(self, x)

    monkeypatch.setattr(StainNormalizer, "forward", spy)
    result = run_infer(cfg_for(synthetic_slide, tmp_path, model=path, device="cpu"))
    assert result.windows > 0 and {m for m, _ in seen} == {"macenko"} and sum(n for _, n in seen) == result.windows
    assert result.colour_qc["reference"] == "model" and result.colour_qc["status"] == "ok"


def test_result_line_of_a_store_made_before_colour_qc_has_no_colour_clause():
    r = InferResult(slide="s", out="o.zarr", status="done", tiles_tissue=1, seconds=1.0, outputs={"store": "o.zarr"})
    assert "colour" not in r.line().lower() and r.colour_qc is None
