"""train/holdout.py: which tiles train the model and which calibrate it (no model needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from wsi_haloae.train.data import TileSet
from wsi_haloae.train.holdout import split_holdout, tile_slides


def tileset(root: Path, per_slide: dict[str, int] | None, n: int = 0, manifest: bool = True) -> TileSet:
    """A TileSet of named (not decoded) tiles; ``per_slide`` writes a tiles.csv naming each tile's slide."""
    root.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    if per_slide is None:
        paths = [root / f"t{i}.png" for i in range(n)]
    else:
        for s, k in per_slide.items():
            for i in range(k):
                paths.append(root / f"{s}_{i}.png")
                rows.append(f"/slides/{s}.svs,{s}_{i}.png,0.5\n")
        if manifest:
            (root / "tiles.csv").write_text("slide,file,mpp\n" + "".join(rows))
    return TileSet(root=root, paths=sorted(paths), skipped=0, cache=np.zeros((len(paths), 1, 1, 3), np.uint8))


def _slides_of(ts: TileSet, idx) -> set[str]:
    s = tile_slides(ts)
    return {s[int(i)] for i in idx}


def test_whole_slides_held_out_when_there_are_three_or_more(tmp_path, caplog):
    sizes = {f"s{i}": 40 + 10 * i for i in range(8)}  # 600 tiles
    ts = tileset(tmp_path / "t", sizes)
    with caplog.at_level(logging.INFO, logger="wsi_haloae.train.holdout"):
        h = split_holdout(ts, 0.1, seed=0)
    assert h.mode == "slides" and not h.warn
    cal, train = _slides_of(ts, h.calibration.index), _slides_of(ts, h.train.index)
    assert cal and train and not cal & train  # no slide on both sides
    assert set(h.slides) == cal and h.n_slides == len(cal)
    assert len(h.calibration) + len(h.train) == len(ts)
    assert 20 <= len(h.calibration) <= 2 * 0.1 * len(ts)
    assert "slides" in caplog.text and "kept out of training" in caplog.text
    # seeded: the same split again, another one for another seed (over a few seeds)
    assert np.array_equal(split_holdout(ts, 0.1, seed=0).calibration.index, h.calibration.index)
    assert any(not np.array_equal(split_holdout(ts, 0.1, seed=s).calibration.index, h.calibration.index) for s in (1, 2, 3))
    # the subset serves the parent's tiles
    assert np.array_equal(h.train.get(0), ts.get(int(h.train.index[0])))
    assert h.describe() == {"mode": "slides", "tiles": len(h.calibration), "slides": h.slides, "n_slides": len(cal)}


def test_three_slides_keep_two_for_training(tmp_path):
    ts = tileset(tmp_path / "t", {"a": 30, "b": 30, "c": 30})
    h = split_holdout(ts, 0.5, seed=0)
    assert h.mode == "slides" and len(h.slides) == 1 and len(_slides_of(ts, h.train.index)) == 2


def test_half_of_the_slides_at_val_fraction_one_half(tmp_path):
    # 6 slides, --val-fraction 0.5: whole slides up to about half of the tiles (a little more is fine)
    ts = tileset(tmp_path / "t", {f"s{i}": 23 + (i % 2) for i in range(6)})
    h = split_holdout(ts, 0.5, seed=0)
    assert h.mode == "slides" and 3 <= len(h.slides) <= 4 and len(_slides_of(ts, h.train.index)) >= 2


def test_tiles_held_out_with_two_slides_or_no_manifest(tmp_path, caplog):
    ts = tileset(tmp_path / "two", {"a": 150, "b": 150})
    with caplog.at_level(logging.INFO, logger="wsi_haloae.train.holdout"):
        h = split_holdout(ts, 0.1, seed=0)
    assert h.mode == "tiles" and len(h.calibration) == 30 and h.n_slides == 2
    assert "2 slides" in caplog.text and "not whole slides" in caplog.text
    ts = tileset(tmp_path / "mvtec", None, n=209)  # MVTec train/good: no tiles.csv
    h = split_holdout(ts, 0.1, seed=0)
    assert h.mode == "tiles" and len(h.calibration) == 21 and h.n_slides is None and h.slides == []
    assert "no tiles.csv" in h.note
    assert not set(h.calibration.index) & set(h.train.index)


def test_slides_of_unequal_size(tmp_path):
    ts = tileset(tmp_path / "t", {"big": 500, "a": 30, "b": 30})
    h = split_holdout(ts, 0.1, seed=0)
    # 10 % = 56 tiles: a or b (30) is taken first, or both; never the big one
    assert h.mode == "slides" and "big" not in " ".join(h.slides)
    ts = tileset(tmp_path / "v", {"big": 500, "a": 400, "b": 300})
    h = split_holdout(ts, 0.1, seed=0)  # every slide is over twice 10 %; the smallest (300 of 1200) is taken
    assert h.mode == "slides" and h.slides == ["/slides/b.svs"]
    ts = tileset(tmp_path / "u", {"big": 500, "a": 200, "b": 200})
    h = split_holdout(ts, 0.05, seed=0)  # the smallest slide (200 of 900) is > twice 5 %: it is still one slide
    assert h.mode == "slides" and len(h.calibration) == 200


def test_too_few_held_out_tiles_train_on_all_with_one_warning(tmp_path, caplog):
    ts = tileset(tmp_path / "t", None, n=80)
    with caplog.at_level(logging.WARNING, logger="wsi_haloae.train.holdout"):
        h = split_holdout(ts, 0.1, seed=0)
    assert h.mode == "none" and h.calibration is None and h.train is ts and h.warn
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "NO calibration" in msgs[0] and "calibrate" in msgs[0]
    assert "fewer than the 20" in msgs[0]
    h = split_holdout(ts, 0.0, seed=0)
    assert h.mode == "none" and h.train is ts and not h.warn
    with pytest.raises(ValueError):
        split_holdout(ts, 0.7, seed=0)


def test_tiles_missing_from_the_manifest_mean_tile_holdout(tmp_path):
    ts = tileset(tmp_path / "t", {"a": 100, "b": 100, "c": 100})
    extra = tmp_path / "t" / "loose.png"
    ts = TileSet(root=ts.root, paths=ts.paths + [extra], skipped=0, cache=None)
    h = split_holdout(ts, 0.1, seed=0)
    assert h.mode == "tiles" and "1 of 301 tiles are not in a tiles.csv" in h.note
