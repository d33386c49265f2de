"""The evolving weighting scheme (EWS) of HaloAE: loss weights that move from the easy task to the hard ones.

Each weight follows a logistic curve in the epoch t, α(t) = (a − b) / (1 + exp(d·(t − c/2))) + b, and the three
are divided by their sum. α1 (classifier) falls from ≈1 to 0.4, α2 (feature reconstruction) rises to 1.2 and
α3 (image reconstruction) rises later to 2. The curves are defined on the paper's 250 epochs; a run of another
length maps its progress onto that axis (t = 250 · progress), so a short run still sees the whole schedule.
"""

from __future__ import annotations

import math

#: (a, b, c, d) per loss: classifier, feature map, image.
EWS_PARAMS: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 0.4, 80.0, 0.07),
    (0.0, 1.2, 150.0, 0.05),
    (0.0, 2.0, 300.0, 0.05),
)
REFERENCE_EPOCHS = 250


def logistic(t: float, a: float, b: float, c: float, d: float) -> float:
    return (a - b) / (1.0 + math.exp(d * (t - c / 2.0))) + b


def ews_weights(t: float) -> tuple[float, float, float]:
    """Normalised (α1, α2, α3) at epoch t of the reference 250-epoch schedule."""
    raw = [logistic(t, *p) for p in EWS_PARAMS]
    s = sum(raw)
    return (raw[0] / s, raw[1] / s, raw[2] / s)


def schedule_time(epoch: float, total_epochs: int) -> float:
    """Map a (possibly fractional) epoch of a run of ``total_epochs`` onto the reference axis."""
    return float(epoch) * REFERENCE_EPOCHS / max(1, total_epochs)


def weights_for(epoch: float, total_epochs: int) -> tuple[float, float, float]:
    return ews_weights(schedule_time(epoch, total_epochs))
