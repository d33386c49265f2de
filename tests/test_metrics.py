"""Metrics: AUROC agrees with scikit-learn; AUPRO is 1 for a perfect map and matches hand and brute-force values."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label
from sklearn.metrics import roc_auc_score

from wsi_haloae.metrics import PixelScores, aupro, image_auroc, integrate_to


def test_image_auroc_agrees_with_sklearn():
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.3, 0.9, 0.2, 0.4]
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    # hand count: 16 pairs; positive above negative in 13, ties (0.4 vs 0.4) count half
    assert image_auroc(labels, scores) == pytest.approx(13.5 / 16)
    assert image_auroc([0, 0], [0.1, 0.2]) is None


def _case():
    a = np.array([[0.1, 0.2], [0.3, 0.4]])
    b = np.array([[0.5, 0.35], [0.05, 0.15]])
    ma = np.zeros((2, 2), bool)
    mb = np.array([[1, 1], [0, 0]], bool)
    return [a, b], [ma, mb]


def test_pixel_auroc_agrees_with_sklearn():
    maps, masks = _case()
    acc = PixelScores()
    for m, g in zip(maps, masks):
        acc.add(m, g)
    ref = roc_auc_score(np.concatenate([g.ravel() for g in masks]), np.concatenate([m.ravel() for m in maps]))
    assert acc.pixel_auroc() == pytest.approx(ref)
    assert acc.pixel_auroc() == pytest.approx(11 / 12)  # 12 (anomalous, normal) pairs, 0.35 < 0.4 is the only miss


def test_pixel_auroc_agrees_with_sklearn_on_random_maps_with_ties():
    rng = np.random.default_rng(5)
    maps = [np.round(rng.random((30, 40)), 2) for _ in range(5)]
    masks = [rng.random((30, 40)) < 0.1 + 0.3 * (m > 0.6) for m in maps]
    masks[0][:] = False
    acc = PixelScores()
    for m, g in zip(maps, masks):
        acc.add(m, g)
    ref = roc_auc_score(np.concatenate([g.ravel() for g in masks]), np.concatenate([m.ravel() for m in maps]))
    assert acc.pixel_auroc() == pytest.approx(ref, abs=1e-12)
    assert 0.6 < ref < 0.95


def test_aupro_hand_made_case():
    # FPR over 6 normal pixels, one region of 2 pixels: PRO 0.5 up to FPR 1/6, then 1.0:
    # area to 0.3 = 0.5·(1/6) + 1.0·(0.3 − 1/6) = 0.21667, normalised by 0.3 → 13/18
    maps, masks = _case()
    assert aupro(maps, masks) == pytest.approx(13 / 18)


def test_aupro_of_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = [np.zeros((32, 32), bool) for _ in range(4)]
    masks[1][3:9, 4:12] = True
    masks[2][20:30, 20:23] = True
    masks[2][2:4, 2:4] = True
    perfect = [m.astype(float) + 0.01 * rng.random(m.shape) for m in masks]
    assert aupro(perfect, masks) == pytest.approx(1.0)
    inverted = [1 - p for p in perfect]
    assert aupro(inverted, masks) == pytest.approx(0.0)
    assert aupro([np.zeros((4, 4))], [np.zeros((4, 4), bool)]) is None


def _aupro_brute_force(maps, masks, limit=0.3):
    """Independent reference: loop over every threshold, measure FPR and mean per-region overlap directly."""
    regions = []
    for i, g in enumerate(masks):
        lab = label(g, connectivity=2)
        regions += [(i, lab == k) for k in range(1, lab.max() + 1)]
    normal = np.concatenate([(~g).ravel() for g in masks])
    allscores = np.concatenate([m.ravel() for m in maps])
    pts = [(0.0, 0.0)]
    for t in np.unique(allscores)[::-1]:
        fpr = (allscores[normal] >= t).mean()
        pro = np.mean([(maps[i][r] >= t).mean() for i, r in regions])
        pts.append((fpr, pro))
    x, y = np.array(pts).T
    # trapezoid to the limit with linear interpolation
    area = 0.0
    for j in range(1, len(x)):
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_aupro_matches_brute_force_on_random_maps():
    rng = np.random.default_rng(1)
    masks = [np.zeros((20, 20), bool) for _ in range(3)]
    masks[0][2:6, 2:8] = True
    masks[0][12:18, 14:16] = True
    masks[2][5:15, 5:9] = True
    maps = [rng.random((20, 20)) + 0.6 * m for m in masks]
    maps = [np.round(m, 2) for m in maps]  # ties, as real maps have
    assert aupro(maps, masks) == pytest.approx(_aupro_brute_force(maps, masks), abs=1e-9)


def test_regions_use_8_connectivity_and_are_counted_per_image():
    acc = PixelScores()
    diag = np.eye(4, dtype=bool)  # one region under 8-connectivity
    acc.add(np.zeros((4, 4)), diag)
    acc.add(np.zeros((4, 4)), diag)
    assert acc.n_regions == 2


def test_integrate_to_interpolates_at_the_limit():
    assert integrate_to(np.array([0, 1.0]), np.array([0, 1.0]), 0.5) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        PixelScores().add(np.zeros((3, 3)), np.zeros((3, 4), bool))
