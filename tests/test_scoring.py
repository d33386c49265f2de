"""scoring/: conformal p-values, Benjamini–Hochberg, Simes, regions and verdicts against direct references."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from wsi_haloae.errors import BadModelFileError
from wsi_haloae.scoring import (Calibration, benjamini_hochberg, calibration_size_needed, cell_area_mm2,
                                conformal_pvalues, connected_regions, mean_map_sha256, min_callable_tiles,
                                resolution_warning, resolve_rule, robust_threshold, simes_pvalue, slide_verdict)
from wsi_haloae.scoring.calibration import sample_ranks


def brute_pvalues(scores, cal):
    """The definition, one score at a time: (1 + #{calibration >= s}) / (n + 1)."""
    n = len(cal)
    out = []
    for s in scores:
        out.append(np.nan if np.isnan(s) else (1 + sum(1 for c in cal if c >= s)) / (n + 1))
    return np.array(out)


def brute_bh(p, alpha):
    """Benjamini–Hochberg from its definition, in exact arithmetic: largest k with p_(k) <= k·alpha/m."""
    idx = [i for i, v in enumerate(p) if v is not None]
    m = len(idx)
    order = sorted(idx, key=lambda i: p[i])
    k_max = 0
    for k, i in enumerate(order, start=1):
        if p[i] <= Fraction(k, m) * alpha:
            k_max = k
    reject = [False] * len(p)
    if k_max:
        cut = p[order[k_max - 1]]
        for i in idx:
            reject[i] = p[i] <= cut
    return np.array(reject)


def test_conformal_pvalues_match_the_definition_with_ties_and_nan():
    rng = np.random.default_rng(1)
    cal = np.round(rng.normal(size=200), 1)  # many ties
    scores = np.concatenate([np.round(rng.normal(size=300), 1), cal[:20], [cal.max() + 1, cal.min() - 1, np.nan]])
    got = conformal_pvalues(scores, np.sort(cal))
    ref = brute_pvalues(scores, cal)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=0, atol=1e-15)
    assert got[-3] == pytest.approx(1 / 201) and got[-2] == 1.0


def test_sampled_calibration_is_conservative_and_exact_in_the_tail():
    rng = np.random.default_rng(2)
    n, keep = 25_000, 1_000
    allscores = rng.gamma(2.0, size=n).astype(np.float32)
    cal = Calibration.from_scores(allscores, rng.random(100), {"tiles": "t"}, max_stored=keep)
    assert cal.n == n and cal.scores.size == keep and cal.ranks is not None
    assert cal.ranks[0] == 0 and cal.ranks[-1] == n - 1
    s = np.concatenate([rng.gamma(2.0, size=3000), allscores[:500], [allscores.max() + 1]]).astype(np.float32).astype(float)
    exact = conformal_pvalues(s, np.sort(allscores.astype(float)))
    sampled = cal.pvalues(s)
    assert np.all(sampled >= exact - 1e-15)  # never smaller: still a valid p-value
    tail = exact <= (keep // 2 + 1) / (n + 1)
    assert tail.sum() > 10
    np.testing.assert_allclose(sampled[tail], exact[tail], rtol=0, atol=1e-15)  # exact where calls are made
    assert np.max(sampled - exact) <= 2 / keep + 1e-12
    # and the sample survives its JSON round trip
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_array_equal(back.pvalues(s), sampled)


def test_sample_ranks():
    assert sample_ranks(50, 100) is None
    r = sample_ranks(1000, 100)
    assert r.size == 100 and np.all(np.diff(r) > 0) and r[0] == 0 and r[-1] == 999
    assert np.array_equal(r[-50:], np.arange(950, 1000))


def test_conformal_pvalues_are_valid_for_exchangeable_scores():
    # P(p <= alpha) = floor(alpha (n + 1)) / (n + 1) <= alpha for a new score exchangeable with n calibration scores
    rng = np.random.default_rng(3)
    n, trials, alpha = 39, 20_000, 0.1
    cal = rng.random((trials, n))
    new = rng.random(trials)
    p = np.array([conformal_pvalues([new[t]], np.sort(cal[t]))[0] for t in range(trials)])
    expected = np.floor(alpha * (n + 1)) / (n + 1)
    assert abs((p <= alpha).mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / trials)
    assert expected <= alpha


@pytest.mark.parametrize("alpha", [Fraction(1, 20), Fraction(1, 10), Fraction(1, 4)])
def test_benjamini_hochberg_matches_its_definition(alpha):
    rng = np.random.default_rng(int(alpha.denominator))
    n = 99
    for trial in range(40):
        m = int(rng.integers(1, 60))
        # conformal-like p-values (multiples of 1/(n+1), so ties and exact boundary cases happen), some NaN
        g = rng.integers(0, n + 1, size=m)
        g[: int(rng.integers(0, m + 1) * 0.3)] = rng.integers(0, 3)  # a few very small ones
        exact = [Fraction(1 + int(v), n + 1) for v in g]
        nan = rng.random(m) < 0.1
        p_exact = [None if z else e for e, z in zip(exact, nan)]
        p = np.array([np.nan if z else float(e) for e, z in zip(exact, nan)])
        got = benjamini_hochberg(p, float(alpha))
        assert np.array_equal(got, brute_bh(p_exact, alpha)), (trial, p)
        assert not got[nan].any()


def test_benjamini_hochberg_known_case():
    # m = 10: bounds 0.005, 0.01, ... ; p_(3) = 0.012 <= 0.015 is the last one under its bound
    p = np.array([0.001, 0.008, 0.012, 0.041, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True, True] + [False] * 7
    assert not benjamini_hochberg(np.array([np.nan, np.nan]), 0.05).any()
    with pytest.raises(ValueError):
        benjamini_hochberg(p, 0)


def test_simes_pvalue_and_its_link_to_bh():
    assert simes_pvalue([0.01, 0.04, 0.5]) == pytest.approx(min(3 * 0.01, 3 * 0.04 / 2, 0.5))
    assert simes_pvalue([np.nan]) is None
    assert simes_pvalue([0.9, np.nan, 0.95]) == pytest.approx(0.95)
    rng = np.random.default_rng(5)
    for _ in range(300):
        p = rng.random(int(rng.integers(1, 40))) ** rng.uniform(0.5, 4)
        for alpha in (0.05, 0.2):
            assert benjamini_hochberg(p, alpha).any() == (simes_pvalue(p) <= alpha)


def test_resolution_helpers():
    # n = 199: smallest p = 1/200; among m = 100 tiles at 0.05, k tiles are called when 1/200 <= k·0.05/100, k >= 10
    assert min_callable_tiles(199, 100, 0.05) == 10
    p = np.full(100, 0.9)
    p[:10] = 1 / 200
    assert benjamini_hochberg(p, 0.05).sum() == 10
    p[9] = 0.9
    assert benjamini_hochberg(p, 0.05).sum() == 0
    assert calibration_size_needed(100, 0.05) == 1999 and min_callable_tiles(1999, 100, 0.05) == 1
    assert calibration_size_needed(30_000, 0.05, k=10) == 59_999
    assert resolution_warning(1999, 100, 0.05) is None
    msg = resolution_warning(199, 30_000, 0.05)
    assert "199" in msg and "30,000" in msg and "599,999" in msg and "\n" not in msg
    assert "no tile can be called" in resolution_warning(10, 30_000, 0.05)


def test_connected_regions_on_a_hand_made_grid():
    # called cells (x) on a 5 x 6 grid:     x x . . . .
    #                                       . x . . x .
    #                                       . . . . . x   <- diagonal: same region as (1, 4)
    #                                       x . . . . .
    #                                       x . . x . .
    cells = [(0, 0), (0, 1), (1, 1), (1, 4), (2, 5), (3, 0), (4, 0), (4, 3)]
    other = [(2, 2), (3, 3)]  # tissue, not called
    rows = np.array([r for r, _ in cells + other])
    cols = np.array([c for _, c in cells + other])
    called = np.array([True] * len(cells) + [False] * len(other))
    reg = connected_regions(rows, cols, called, (5, 6))
    assert reg.count == 4 and sorted(reg.sizes.tolist()) == [1, 2, 2, 3] and reg.largest == 3
    assert reg.labels[0, 0] == reg.labels[1, 1] and reg.labels[1, 4] == reg.labels[2, 5] != 0
    assert reg.labels[2, 2] == 0
    assert connected_regions(rows, cols, np.zeros_like(called), (5, 6)).largest == 0


def test_cell_area():
    assert cell_area_mm2(256, 0.5) == pytest.approx(0.128 ** 2)
    with pytest.raises(ValueError):
        cell_area_mm2(256, 0)


def _cal(n=99, seed=0) -> Calibration:
    rng = np.random.default_rng(seed)
    return Calibration.from_scores(rng.normal(1.0, 0.1, n), rng.random(5000), {"tiles": "/t", "source": "training hold-out"},
                                   mean_map=np.zeros((64, 64), np.float32))


def test_slide_verdict_fdr_calls_the_planted_block_and_sums_areas():
    cal = _cal(n=999)
    n_rows, n_cols = 10, 12
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rr.ravel(), cc.ravel()
    rng = np.random.default_rng(1)
    scores = rng.normal(1.0, 0.1, rows.size)
    block = (rows >= 2) & (rows < 5) & (cols >= 3) & (cols < 7)  # 12 tiles far beyond every calibration score
    scores[block] = 5.0
    scores[0] = np.nan  # an unreadable tissue tile
    v = slide_verdict(scores, rows, cols, (n_rows, n_cols), 0.0625, cal, alpha=0.05, rule="fdr")
    assert v.verdict == "anomalous" and v.rule == "fdr" and v.alpha == 0.05
    assert v.tissue_tiles == rows.size - 1 and v.unscored_tiles == 1
    assert v.anomalous[block].all()
    assert v.anomalous_tiles >= 12 and v.largest_region_tiles >= 12
    assert v.anomalous_area_mm2 == pytest.approx(v.anomalous_tiles * 0.0625)
    assert v.largest_region_mm2 == pytest.approx(v.largest_region_tiles * 0.0625)
    assert v.simes_pvalue <= 0.05 and v.pvalue_cutoff is not None
    assert not v.anomalous[0] and np.isnan(v.pvalues[0])
    d = v.to_dict()
    json.dumps(d)
    assert d["verdict"] == "anomalous" and d["calibration_n"] == 999 and "pvalues" not in d
    assert "anomalous" in v.line() and "mm²" in v.line()


def test_slide_verdict_normal_no_tissue_and_mad():
    cal = _cal(n=999)
    rng = np.random.default_rng(2)
    rows, cols = np.repeat(np.arange(8), 8), np.tile(np.arange(8), 8)
    normal = rng.normal(1.0, 0.1, 64)
    v = slide_verdict(normal, rows, cols, (8, 8), None, cal)
    assert v.verdict == "normal" and v.anomalous_tiles == 0 and v.simes_pvalue > 0.05
    assert v.anomalous_area_mm2 is None and v.largest_region_mm2 is None
    empty = slide_verdict(np.array([np.nan, np.nan]), np.array([0, 0]), np.array([0, 1]), (1, 2), 0.01, cal)
    assert empty.verdict == "no tissue" and empty.tissue_tiles == 0 and empty.anomalous_fraction is None
    assert empty.simes_pvalue is None and "no tissue" in empty.line()
    none = slide_verdict(np.zeros(0), np.zeros(0, int), np.zeros(0, int), (0, 0), 0.01, cal)
    assert none.verdict == "no tissue"
    # the per-slide rule: exactly the old median + 3·1.4826·MAD threshold, with or without a calibration
    mad = slide_verdict(normal, rows, cols, (8, 8), 0.01, None, rule="mad")
    thr = robust_threshold(normal)["value"]
    assert mad.score_threshold == thr and np.array_equal(mad.anomalous, normal > thr)
    assert mad.alpha is None and mad.simes_pvalue is None and mad.pvalues is None
    assert mad.verdict == ("anomalous" if (normal > thr).any() else "normal")
    with pytest.raises(ValueError):
        slide_verdict(normal, rows, cols, (8, 8), 0.01, None, rule="fdr")


def test_resolve_rule():
    assert resolve_rule("fdr", True) == ("fdr", None)
    rule, warning = resolve_rule("fdr", False, "model m.safetensors")
    assert rule == "mad" and "m.safetensors" in warning and "calibrate" in warning
    assert resolve_rule("mad", True) == ("mad", None)


def test_calibration_round_trip_and_display_range():
    cal = _cal()
    d = json.loads(json.dumps(cal.to_dict()))
    back = Calibration.from_dict(d, mean_map=np.zeros((64, 64), np.float32))
    assert back.n == cal.n and np.array_equal(back.scores, cal.scores) and back.ranks is None
    assert back.display_range == cal.display_range
    lo, hi = cal.display_range
    assert lo == pytest.approx(cal.pixel_quantiles[0.5], rel=1e-6) and hi == pytest.approx(cal.pixel_quantiles[0.999], rel=1e-6)
    assert cal.provenance["source"] == "training hold-out" and cal.provenance["date"]
    assert cal.mean_map_sha256 == mean_map_sha256(np.zeros((64, 64)))
    s = cal.summary()
    assert "scores" not in s and s["n"] == cal.n and s["min_pvalue"] == pytest.approx(1 / (cal.n + 1))
    # float32 scores read back exactly: a tile scoring the same as a calibration tile gets the same p-value
    tile = np.float32(cal.scores[50])
    assert back.pvalues(np.array([tile]))[0] == brute_pvalues([float(tile)], cal.scores)[0]


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.update(format="other/1"), "format"),
    (lambda d: d.update(n=0), "n = 0"),
    (lambda d: d.update(n=5), "scores for n"),
    (lambda d: d["scores"].reverse(), "out of order"),
    (lambda d: d["scores"].__setitem__(3, "x"), "list of numbers"),
    (lambda d: d.update(statistic="tile max"), "tile score"),
    (lambda d: d.update(display_range=[2.0, 1.0]), "display range"),
    (lambda d: d.update(pixel_quantiles={"0.5": 2.0, "0.9": 1.0}), "pixel quantiles"),
    (lambda d: d.update(provenance={}), "provenance"),
    (lambda d: d.update(mean_map_sha256="ab" * 32), "another model"),
    (lambda d: d.update(ranks=[0, 1]), "ranks"),
])
def test_tampered_calibration_is_one_line_bad_model_file(edit, words):
    d = json.loads(json.dumps(_cal().to_dict()))
    edit(d)
    with pytest.raises(BadModelFileError) as e:
        Calibration.from_dict(d, "model file m.safetensors", mean_map=np.zeros((64, 64), np.float32))
    msg = str(e.value)
    assert msg.startswith("model file m.safetensors: calibration block") and words in msg and "\n" not in msg
