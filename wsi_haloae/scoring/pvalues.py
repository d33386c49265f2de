"""Conformal p-values, Benjamini–Hochberg calls and Simes' combination: the statistics behind a tile's call.

Hand-written (a few lines of numpy each) because the field's implementations live in statsmodels, which is
not a dependency, and because the conformal p-value needs our stored-sample rule (see ``conformal_pvalues``).
NaN p-values (tiles that could not be scored) are left out of every procedure, never counted as tests.
"""

from __future__ import annotations

import math

import numpy as np

#: Relative slack on the Benjamini–Hochberg comparison p_(k) <= k·alpha/m, so that a p-value equal to its
#: bound in exact arithmetic is not lost to floating-point rounding (the definition says "<=").
_TIE = 1e-12


def conformal_pvalues(scores, reference: np.ndarray, n: int | None = None, ranks: np.ndarray | None = None) -> np.ndarray:
    """p = (1 + #{calibration scores >= s}) / (n + 1) for every score s (vectorised; NaN in, NaN out).

    ``reference``: calibration scores sorted ascending. When it holds all n scores, ``ranks`` is None and the
    count is exact. When it holds a sample of them, ``ranks[i]`` is the 0-based rank of ``reference[i]`` among
    all n (strictly increasing, the largest score kept), and the count used is the largest one compatible with
    the sample: if the largest kept score below s has rank r, at most n − 1 − r scores can be >= s. That count
    is never smaller than the true one, so each p-value is >= the p-value from all n scores: the test stays
    valid (conservative), and it is exact wherever the kept ranks are consecutive (the upper tail, see
    ``Calibration``).
    """
    ref = np.asarray(reference, dtype=np.float64)
    k = ref.shape[0]
    n = k if n is None else int(n)
    s = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(ref, s, side="left")  # kept scores strictly below s
    if ranks is None:
        if n != k:
            raise ValueError(f"conformal_pvalues: {k} reference scores but n = {n} and no ranks")
        at_least = n - below
    else:
        r = np.asarray(ranks, dtype=np.int64)
        if r.shape != ref.shape:
            raise ValueError("conformal_pvalues: ranks and reference differ in length")
        prev = np.where(below > 0, r[np.maximum(below - 1, 0)], -1)
        at_least = n - 1 - prev
    p = (1.0 + at_least) / (n + 1.0)
    return np.where(np.isnan(s), np.nan, p)


def benjamini_hochberg(pvalues, alpha: float) -> np.ndarray:
    """Boolean mask of the tests the Benjamini–Hochberg step-up procedure rejects at level ``alpha``.

    With m finite p-values sorted p_(1) <= ... <= p_(m), let k be the largest i with p_(i) <= i·alpha/m;
    reject every test with p <= p_(k) (none when there is no such i). It controls the false discovery rate
    (expected share of false calls among the calls) at alpha for independent or positively dependent tests,
    which conformal p-values sharing one calibration set are (Bates et al., Ann. Statist. 2023).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = np.asarray(pvalues, dtype=np.float64)
    ok = np.isfinite(p)
    m = int(ok.sum())
    out = np.zeros(p.shape, dtype=bool)
    if m == 0:
        return out
    ps = np.sort(p[ok])
    crit = alpha * np.arange(1, m + 1, dtype=np.float64) / m
    hits = np.flatnonzero(ps <= crit * (1 + _TIE))
    if hits.size == 0:
        return out
    cutoff = ps[hits[-1]]
    out[ok] = p[ok] <= cutoff
    return out


def simes_pvalue(pvalues) -> float | None:
    """Simes' combined p-value min_i(m·p_(i)/i) of the finite p-values (None when there is none).

    It tests "every tile is normal" and is valid under positive dependence. Its link to the calls:
    Benjamini–Hochberg at alpha makes at least one call exactly when this p-value is <= alpha.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    p = np.sort(p[np.isfinite(p)])
    m = p.size
    if m == 0:
        return None
    return float(min(1.0, np.min(m * p / np.arange(1, m + 1))))


# --------------------------------------------------------------------------------------------- resolution
def min_callable_tiles(n: int, m: int, alpha: float) -> int:
    """The fewest tiles that must all be as extreme as possible before Benjamini–Hochberg calls any of m.

    With n calibration tiles the smallest p-value is 1/(n + 1); k such tiles are called when
    1/(n + 1) <= k·alpha/m, i.e. k >= m / (alpha·(n + 1)). A result larger than m means no call is possible.
    """
    if n < 0 or m < 0:
        raise ValueError("n and m must be >= 0")
    if m == 0:
        return 0
    return max(1, math.ceil(m / (alpha * (n + 1)) * (1 - _TIE)))


def calibration_size_needed(m: int, alpha: float, k: int = 1) -> int:
    """The fewest calibration tiles with which k extreme tiles among m can be called at alpha: n >= m/(k·alpha) − 1."""
    if k < 1:
        raise ValueError("k must be >= 1")
    return max(0, math.ceil(m / (k * alpha) * (1 - _TIE) - 1))


def resolution_warning(n: int, m: int, alpha: float, k: int = 1) -> str | None:
    """A one-line warning when n calibration tiles are too few to call a region of k tiles among m, else None.

    DESIGN §8.4: calling k of m tiles at alpha needs n >~ m/(alpha·k) calibration tiles.
    """
    if m == 0 or min_callable_tiles(n, m, alpha) <= k:
        return None
    need = min_callable_tiles(n, m, alpha)
    what = "no tile can be called at all" if need > m else f"a call needs at least {need:,} tiles more extreme than every calibration tile"
    return (f"the model's calibration has {n:,} tiles: with {m:,} tissue tiles at FDR {alpha:g}, {what} "
            f"(calling {k:,} tile{'s' if k > 1 else ''} needs >= {calibration_size_needed(m, alpha, k):,}); "
            f"recalibrate on more normal tiles (wsi-haloae tiles + wsi-haloae calibrate)")
