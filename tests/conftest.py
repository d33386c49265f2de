"""Shared fixtures: where ../shared/data is, small synthetic slides, and CPU-friendly settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_HALOAE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a clean skip when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory) -> Path:
    """A 2048x2048 pyramidal TIFF at 0.5 mpp with one tissue island and a planted anomaly."""
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "synthetic.tif", width=2048, height=2048, mpp=0.5)


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    # two cores: keep torch from oversubscribing when DataLoader workers run beside it
    try:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:  # pragma: no cover
        pass
    yield
