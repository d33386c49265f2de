"""The calibration of a model: its tile scores on normal tissue it never trained on, kept in the model file.

A raw tile score (mean of the post-processed anomaly map) has a scale that depends on the model. Its rank
among the scores of normal calibration tiles does not: that rank is the conformal p-value, "what share of
normal tissue looks at least this unusual". The calibration also fixes a colour scale for every map the model
makes, from the distribution of normal *pixels*, so the same colour means the same value on every slide.

Stored scores: all of them up to ``MAX_STORED``; beyond that the top ``MAX_STORED // 2`` exactly (the tail,
where calls are made) and evenly spaced order statistics below, each with its rank among all n. The p-value
then uses the largest count compatible with the sample (``pvalues.conformal_pvalues``): never smaller than the
exact p-value (still valid, i.e. conservative), exact for p <= (MAX_STORED // 2 + 1)/(n + 1), and in the bulk
too large by at most (gap between kept ranks)/(n + 1) < 2/MAX_STORED = 0.0002, where no call is made anyway.

JSON layout (``to_dict``, the ``calibration`` key of the model file's metadata): see docs/scores.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BadModelFileError
from .pvalues import conformal_pvalues

FORMAT = "wsi-haloae-calibration/1"
#: The tile statistic calibrated: must be the tile score inference writes (``tiles/score_mean``).
STATISTIC = "tile mean of the post-processed anomaly map"
SOURCES = ("training hold-out", "calibrate")
#: Fewer held-out tiles than this: no calibration (the smallest p-value would be > 1/21 ≈ 0.048).
MIN_TILES = 20
MAX_STORED = 10_000
PIXEL_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)
#: Display range = these pixel quantiles of normal tissue: the bottom colour is typical normal tissue (its
#: median pixel), the top one a value only 1 normal pixel in 1,000 reaches.
DISPLAY_QUANTILES = (0.5, 0.999)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def mean_map_sha256(mean_map) -> str:
    """sha256 of the training mean map as little-endian float32: ties a calibration to the model it measured."""
    a = np.ascontiguousarray(np.asarray(mean_map, dtype=np.float32), dtype="<f4")
    return hashlib.sha256(a.tobytes()).hexdigest()


def sample_ranks(n: int, max_stored: int = MAX_STORED) -> np.ndarray | None:
    """0-based ranks of the sorted scores to keep: None (keep all) for n <= max_stored, else the top half of
    ``max_stored`` exactly and the rest evenly spaced over the bulk (lowest and highest always kept)."""
    if n <= max_stored:
        return None
    tail = max_stored // 2
    bulk = np.unique(np.round(np.linspace(0, n - tail - 1, max_stored - tail)).astype(np.int64))
    return np.concatenate([bulk, np.arange(n - tail, n, dtype=np.int64)])


def _float32_json(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (scores are float32 in every output)."""
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


@dataclass(frozen=True)
class Calibration:
    """n normal tiles' scores (``scores`` sorted; ``ranks`` None when all n are kept), normal-pixel quantiles,
    a display range and where it all came from (``provenance``)."""

    n: int
    scores: np.ndarray
    ranks: np.ndarray | None
    pixel_quantiles: dict[float, float]
    pixel_count: int
    display_range: tuple[float, float]
    provenance: dict[str, Any] = field(default_factory=dict)
    mean_map_sha256: str | None = None

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_scores(cls, scores, pixel_values, provenance: dict[str, Any], mean_map=None,
                    max_stored: int = MAX_STORED) -> "Calibration":
        """From the tile scores of n normal tiles and a sample of their post-processed pixel values."""
        s = np.sort(np.asarray(scores, dtype=np.float32).astype(np.float64))
        if s.size == 0 or not np.isfinite(s).all():
            raise ValueError("Calibration.from_scores: needs finite scores")
        px = np.asarray(pixel_values, dtype=np.float64).ravel()
        px = px[np.isfinite(px)]
        if px.size == 0:
            raise ValueError("Calibration.from_scores: needs finite pixel values")
        n = int(s.size)
        ranks = sample_ranks(n, max_stored)
        kept = s if ranks is None else s[ranks]
        qs = np.quantile(px, PIXEL_QUANTILES)
        pq = {q: _float32_json(v) for q, v in zip(PIXEL_QUANTILES, qs.tolist())}
        lo, hi = (pq[q] for q in DISPLAY_QUANTILES)
        if not hi > lo:  # a flat map: any scale shows it; keep the range non-empty
            hi = _float32_json(lo + max(abs(lo) * 1e-3, 1e-6))
        prov = {"source": "calibrate", "date": now_utc(), **provenance}
        return cls(n=n, scores=kept, ranks=ranks, pixel_quantiles=pq,
                   pixel_count=int(px.size), display_range=(lo, hi), provenance=prov,
                   mean_map_sha256=None if mean_map is None else mean_map_sha256(mean_map))

    # ------------------------------------------------------------------------------------------ using
    def pvalues(self, scores) -> np.ndarray:
        """Conformal p-value of each tile score (float64; NaN for NaN scores)."""
        return conformal_pvalues(scores, self.scores, self.n, self.ranks)

    @property
    def min_pvalue(self) -> float:
        """The smallest p-value this calibration can give: 1/(n + 1)."""
        return 1.0 / (self.n + 1)

    def score_quantile(self, q: float) -> float:
        """A quantile of the calibration's tile scores (from the kept scores; exact in the kept tail)."""
        if self.ranks is None:
            return float(np.quantile(self.scores, q))
        return float(np.interp(q * (self.n - 1), self.ranks, self.scores))

    def summary(self) -> dict[str, Any]:
        """Everything but the scores: what a heatmap store's attributes and a report record."""
        return {
            "format": FORMAT,
            "n": self.n,
            "min_pvalue": self.min_pvalue,
            "score_quantiles": {str(q): self.score_quantile(q) for q in (0.5, 0.9, 0.99)},
            "pixel_quantiles": {str(q): v for q, v in self.pixel_quantiles.items()},
            "display_range": list(self.display_range),
            "mean_map_sha256": self.mean_map_sha256,
            "provenance": dict(self.provenance),
        }

    def line(self) -> str:
        p = self.provenance
        src = p.get("source", "?")
        where = p.get("tiles") or "?"
        slides = p.get("n_slides")
        return (f"calibration: {self.n:,} normal tiles ({src}, {where}"
                + (f", {slides} slide{'s' if slides != 1 else ''}" if slides else "")
                + f", {p.get('date', '?')}); smallest p-value 1/{self.n + 1:,}; "
                f"display range {self.display_range[0]:.4g}-{self.display_range[1]:.4g}")

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "statistic": STATISTIC,
            "n": self.n,
            "scores": [_float32_json(v) for v in self.scores],
            "ranks": None if self.ranks is None else [int(r) for r in self.ranks],
            "pixel_quantiles": {str(q): float(v) for q, v in self.pixel_quantiles.items()},
            "pixel_count": self.pixel_count,
            "display_range": [float(self.display_range[0]), float(self.display_range[1])],
            "mean_map_sha256": self.mean_map_sha256,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "calibration", mean_map=None) -> "Calibration":
        """Parse and check a ``to_dict`` block; anything wrong is one-line ``BadModelFileError`` naming ``where``.

        With ``mean_map`` given, the block must have been measured with that mean map (same model).
        """
        def bad(reason: str) -> BadModelFileError:
            return BadModelFileError(f"{where}: calibration block {reason} (edited or damaged? recalibrate with "
                                     "`wsi-haloae calibrate`)")

        if not isinstance(d, dict):
            raise bad(f"is a {type(d).__name__}, not an object")
        if d.get("format") != FORMAT:
            raise bad(f"has format {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("statistic") != STATISTIC:
            raise bad(f"calibrates {d.get('statistic')!r}, not the tile score ({STATISTIC!r})")
        n = d.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise bad(f"has n = {n!r}, expected a positive integer")
        # scores are float32 values (what every output holds): read them back exactly as float32
        scores = _finite_array(d.get("scores"), "scores", bad).astype(np.float32).astype(np.float64)
        if not np.isfinite(scores).all():
            raise bad("has scores beyond the float32 range")
        if scores.size == 0 or scores.size > n:
            raise bad(f"holds {scores.size} scores for n = {n}")
        if np.any(np.diff(scores) < 0):
            raise bad("has scores out of order (they must be sorted ascending)")
        raw_ranks = d.get("ranks")
        if scores.size == n:
            if raw_ranks is not None:
                ranks_chk = np.asarray(raw_ranks)
                if ranks_chk.shape != (n,) or np.any(ranks_chk != np.arange(n)):
                    raise bad("has ranks that do not match its scores")
            ranks = None
        else:
            if not isinstance(raw_ranks, list) or len(raw_ranks) != scores.size or not all(
                    isinstance(r, int) and not isinstance(r, bool) for r in raw_ranks):
                raise bad(f"keeps {scores.size} of {n} scores but not one integer rank per kept score")
            ranks = np.asarray(raw_ranks, dtype=np.int64)
            if ranks[0] < 0 or ranks[-1] != n - 1 or np.any(np.diff(ranks) <= 0):
                raise bad("has ranks that are not increasing from >= 0 to n - 1")
        pq_raw = d.get("pixel_quantiles")
        if not isinstance(pq_raw, dict) or not pq_raw:
            raise bad("has no pixel quantiles")
        try:
            pq = {float(k): float(v) for k, v in pq_raw.items()}
        except (TypeError, ValueError):
            raise bad("has non-numeric pixel quantiles") from None
        keys = sorted(pq)
        if not all(0 <= q <= 1 for q in keys) or not all(math.isfinite(v) for v in pq.values()) or any(
                pq[a] > pq[b] for a, b in zip(keys, keys[1:])):
            raise bad("has pixel quantiles that are not finite and increasing")
        pixel_count = d.get("pixel_count")
        if not isinstance(pixel_count, int) or isinstance(pixel_count, bool) or pixel_count < 1:
            raise bad(f"has pixel_count = {pixel_count!r}")
        dr = _finite_array(d.get("display_range"), "display_range", bad)
        if dr.shape != (2,) or not dr[1] > dr[0]:
            raise bad(f"has display range {d.get('display_range')!r} (expected [low, high], low < high)")
        digest = d.get("mean_map_sha256")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 64):
            raise bad("has a malformed mean_map_sha256")
        if mean_map is not None and digest is not None and digest != mean_map_sha256(mean_map):
            raise bad("was measured with another model (its mean map differs)")
        prov = d.get("provenance")
        if not isinstance(prov, dict) or prov.get("source") not in SOURCES or not isinstance(prov.get("date"), str):
            raise bad(f"has no provenance (source one of {', '.join(SOURCES)}, and a date)")
        return cls(n=n, scores=scores, ranks=ranks, pixel_quantiles=pq, pixel_count=pixel_count,
                   display_range=(float(dr[0]), float(dr[1])), provenance=dict(prov), mean_map_sha256=digest)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], where: str = "model file") -> "Calibration | None":
        """The calibration of a model's metadata (``LoadedModel.metadata``), None when it has none."""
        block = (metadata or {}).get("calibration")
        return None if block is None else cls.from_dict(block, where)


def _finite_array(v: Any, name: str, bad) -> np.ndarray:
    if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise bad(f"has {name} that are not a list of numbers")
    a = np.asarray(v, dtype=np.float64)
    if not np.isfinite(a).all():
        raise bad(f"has non-finite {name}")
    return a


def check_block(block: Any, where: str, mean_map=None) -> dict[str, Any] | None:
    """Validate a model file's ``calibration`` metadata on load: the block back unchanged, or None if absent."""
    if block is None:
        return None
    Calibration.from_dict(block, where, mean_map=mean_map)
    return block
