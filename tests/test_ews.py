"""The evolving weighting scheme against the values of DESIGN.md section 4."""

from __future__ import annotations

import pytest

from wsi_haloae.train.ews import ews_weights, schedule_time, weights_for


@pytest.mark.parametrize(
    "t, expected",
    [(0, (0.97, 0.03, 0.00)), (75, (0.41, 0.55, 0.04)), (250, (0.11, 0.34, 0.55))],
)
def test_ews_matches_design(t, expected):
    got = ews_weights(t)
    assert sum(got) == pytest.approx(1.0)
    for g, e in zip(got, expected):
        assert abs(g - e) <= 0.01, (t, got)


def test_ews_trends():
    a0, a_mid, a_end = ews_weights(0), ews_weights(125), ews_weights(250)
    assert a0[0] > a_mid[0] > a_end[0]  # classification first
    assert a0[2] < a_mid[2] < a_end[2]  # image reconstruction last


def test_short_runs_rescale_the_schedule():
    assert schedule_time(5, 10) == 125
    assert weights_for(5, 10) == ews_weights(125)
    assert weights_for(30, 100) == pytest.approx(ews_weights(75))
