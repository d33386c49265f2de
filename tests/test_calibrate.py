"""Calibration at training time and the ``calibrate`` command: what is held out, what is stored, what is kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from skimage.data import immunohistochemistry

from wsi_haloae.cli import main
from wsi_haloae.config import TrainConfig
from wsi_haloae.errors import BadModelFileError
from wsi_haloae.fileio import output_lock
from wsi_haloae.model.anomaly_map import postprocess, tile_scores
from wsi_haloae.model.checkpoint import load_model, rewrite_metadata
from wsi_haloae.model.features import file_sha256
from wsi_haloae.scoring import Calibration
from wsi_haloae.train import trainer
from wsi_haloae.train.data import to_tensor


def write_tiles(folder: Path, n: int, slides: int, seed: int, mpp: float = 0.5) -> Path:
    """n real IHC crops at seeded random places, and the tiles.csv `wsi-haloae tiles` writes (slide per tile)."""
    folder.mkdir(parents=True, exist_ok=True)
    im = immunohistochemistry()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y, x = rng.integers(0, 256, 2)
        name = f"s{i % slides}_{i}.png"
        Image.fromarray(im[y:y + 256, x:x + 256]).save(folder / name)
        rows.append(f"/slides/s{i % slides}.svs,{name},{mpp}\n")
    (folder / "tiles.csv").write_text("slide,file,mpp\n" + "".join(rows))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on 4 slides' tiles with half of them (2 whole slides, 22 tiles) held out."""
    tiles = write_tiles(tmp_path_factory.mktemp("tiles") / "normal", 44, slides=4, seed=0)
    out = tmp_path_factory.mktemp("model") / "model.safetensors"
    seen: list[int] = []
    real = trainer.training_mean_map

    def spy(model, tiles_, *a, **kw):
        seen.extend(int(i) for i in tiles_.index)
        return real(model, tiles_, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "training_mean_map", spy)
        trainer.run_train(TrainConfig(tiles=tiles, out=out, preset="tiny", epochs=1, samples_per_epoch=2, batch_size=1,
                                      backbone_weights="random", workers=0, device="cpu", seed=0, val_fraction=0.5))
    return tiles, out, seen


def test_training_holds_out_whole_slides_and_stores_their_calibration(trained):
    tiles, model, mean_map_tiles = trained
    lm = load_model(model)
    meta = lm.metadata
    hold = meta["holdout"]
    assert hold["mode"] == "slides" and hold["tiles"] == 22 and hold["n_slides"] == 2
    assert meta["tile_count"] == 22 and meta["train"]["val_fraction"] == 0.5
    cal = Calibration.from_metadata(meta)
    assert cal.n == 22 and cal.ranks is None
    assert cal.provenance["source"] == "training hold-out" and cal.provenance["holdout"] == "slides"
    assert cal.provenance["tiles"] == str(tiles.resolve()) and cal.provenance["mpp"] == 0.5
    assert sorted(cal.provenance["slides"]) == hold["slides"] and len(hold["slides"]) == 2
    held = {p.name for p in sorted(tiles.glob("*.png")) if f"/slides/{p.name.split('_')[0]}.svs" in hold["slides"]}
    assert len(held) == 22
    # the mean map saw the 22 training tiles only (indices into the sorted tile list)
    names = [p.name for p in sorted(tiles.glob("*.png"))]
    assert len(mean_map_tiles) == 22 and not {names[i] for i in mean_map_tiles} & held
    # the calibration scores are the held-out tiles scored as inference scores them: eval mode, the stored
    # training mean map, post-processing, mean of the map
    x = torch.stack([to_tensor(np.asarray(Image.open(tiles / n).convert("RGB"))) for n in sorted(held)])
    with torch.no_grad():
        mean, _ = tile_scores(postprocess(lm.model.eval().anomaly_map(x), lm.mean_map))
    np.testing.assert_allclose(np.sort(mean.numpy()), cal.scores, rtol=1e-4)
    lo, hi = cal.display_range
    assert 0 <= lo < hi and cal.pixel_count > 0


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_calibrate_in_place_keeps_every_tensor_and_entry(trained, tmp_path):
    _, model, _ = trained
    site = write_tiles(tmp_path / "site", 21, slides=3, seed=7)
    m = tmp_path / "m.safetensors"
    shutil.copy(model, m)
    sha_before = file_sha256(m)
    r = CliRunner().invoke(main, ["calibrate", "--model", str(m), "--tiles", str(site), "--out", str(m),
                                  "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    last = r.stderr.strip().splitlines()[-1]
    assert "calibrated" in last and "21 normal tiles from 3 slides" in last and "(replaced in place)" in last
    before, after = _tensors(model), _tensors(m)
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    hb, ha = _header(model), _header(m)
    assert {k for k in hb if hb[k] != ha[k]} == {"metadata"}
    ub, ua = json.loads(hb["metadata"]), json.loads(ha["metadata"])
    assert {k for k in ub if ub[k] != ua[k]} == {"calibration"}
    cal = Calibration.from_metadata(load_model(m).metadata)
    p = cal.provenance
    assert cal.n == 21 and p["source"] == "calibrate" and p["model_sha256"] == sha_before and p["n_slides"] == 3
    assert p["tiles"] == str(site.resolve()) and p["replaces"]["n"] == 22 and p["replaces"]["source"] == "training hold-out"
    assert not list(tmp_path.glob(".*.part")) and not list(tmp_path.glob(".*.lock"))


def _cli_error(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and r.stdout == "", (r.exit_code, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_calibrate_refuses_bad_requests_before_writing(trained, tmp_path):
    tiles, model, _ = trained
    sha = file_sha256(model)
    few = write_tiles(tmp_path / "few", 5, slides=1, seed=1)
    assert "5 image files" in _cli_error(["calibrate", "--model", str(model), "--tiles", str(few), "--out",
                                             str(tmp_path / "o.safetensors"), "--device", "cpu"])
    zoomed = write_tiles(tmp_path / "zoomed", 20, slides=2, seed=2, mpp=0.25)
    assert "0.25" in _cli_error(["calibrate", "--model", str(model), "--tiles", str(zoomed), "--out",
                                 str(tmp_path / "o.safetensors"), "--device", "cpu"])
    assert "inside the --tiles" in _cli_error(["calibrate", "--model", str(model), "--tiles", str(tiles), "--out",
                                               str(tiles / "m.safetensors")])
    assert "not found" in _cli_error(["calibrate", "--model", str(tmp_path / "none.safetensors"), "--tiles", str(tiles),
                                      "--out", str(tmp_path / "o.safetensors")])
    out = tmp_path / "locked.safetensors"
    with output_lock(out, "model file"):
        assert "another wsi-haloae run" in _cli_error(["calibrate", "--model", str(model), "--tiles", str(tiles),
                                                       "--out", str(out)])
    assert file_sha256(model) == sha and not (tmp_path / "o.safetensors").exists() and not out.exists()


def test_calibrating_on_the_training_tiles_warns(trained, tmp_path, monkeypatch, caplog):
    import logging

    from wsi_haloae.train import calibration

    tiles, model, _ = trained
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: None)  # stop before scoring: the warning is the point
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(main, ["calibrate", "--model", str(model), "--tiles", str(tiles), "--out",
                                      str(tmp_path / "o.safetensors"), "--device", "cpu"])
    assert r.exit_code == 2 and "no calibration written" in r.stderr
    assert "the tiles the model was trained on" in caplog.text
    assert not (tmp_path / "o.safetensors").exists()


def test_tampered_calibration_is_a_bad_model_file(trained, tmp_path):
    _, model, _ = trained
    block = load_model(model).metadata["calibration"]
    for edit in (lambda b: b["scores"].__setitem__(0, 1e9), lambda b: b.update(n=3),
                 lambda b: b.update(mean_map_sha256="0" * 64)):
        bad_block = json.loads(json.dumps(block))
        edit(bad_block)
        bad = rewrite_metadata(model, tmp_path / "bad.safetensors", {"calibration": bad_block})
        with pytest.raises(BadModelFileError, match="calibration block"):
            load_model(bad)
        assert "calibration block" in _cli_error(["info", "--model", str(bad)])
    # a model without a block loads as before, with calibration None
    plain = rewrite_metadata(model, tmp_path / "plain.safetensors", {"calibration": None})
    assert load_model(plain).metadata["calibration"] is None
    r = CliRunner().invoke(main, ["info", "--model", str(plain)])
    assert r.exit_code == 0 and "calibration:       none" in r.stdout
