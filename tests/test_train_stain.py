"""Training with stain options: which method a run uses, its reference, and what the model file records."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage.data import immunohistochemistry

from wsi_haloae.cli import main
from wsi_haloae.config import TrainConfig
from wsi_haloae.errors import BadTilesError
from wsi_haloae.model import build_model, load_model
from wsi_haloae.train.data import load_tiles
from wsi_haloae.train.stain import resolve_method, setup_stain


def write_tiles(folder: Path, n: int = 6, grey: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    im = immunohistochemistry()
    for i in range(n):
        crop = im[(i // 3) * 200 : (i // 3) * 200 + 256, (i % 3) * 120 : (i % 3) * 120 + 256]
        if grey:
            crop = np.repeat(crop.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
        Image.fromarray(crop).save(folder / f"t{i}.png")
    return folder


def cfg(tiles: Path, out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", epochs=1, samples_per_epoch=1, batch_size=1, backbone_weights="random", workers=0,
                seed=0, device="cpu")
    return TrainConfig(tiles=tiles, out=out, **{**base, **kw})


def test_auto_is_macenko_for_tiles_and_none_for_an_mvtec_folder(tmp_path):
    tiles = write_tiles(tmp_path / "tiles")
    assert resolve_method("auto", tiles) == "macenko"
    write_tiles(tmp_path / "bottle" / "train" / "good", n=2)
    assert resolve_method("auto", tmp_path / "bottle") == "none"
    assert resolve_method("reinhard", tmp_path / "bottle") == "reinhard"
    with pytest.raises(BadTilesError, match="stain-normalize"):
        resolve_method("vahadane", tiles)


@pytest.mark.parametrize("method", ["auto", "macenko", "reinhard", "none"])
def test_setup_fits_the_reference_on_the_tiles(tmp_path, method):
    tiles = write_tiles(tmp_path / "tiles")
    model = build_model("tiny", backbone_weights="random")
    meta = setup_stain(model, load_tiles(tiles, progress=False), cfg(tiles, tmp_path / "m.safetensors", stain_normalize=method),
                       torch.device("cpu"))
    expected = "macenko" if method == "auto" else method
    assert model.stain.method == expected and meta["normalize"] == expected and meta["requested"] == method
    assert meta["augment"] == 0.05
    # the reference is fitted whatever the method: a model without normalisation still knows its stain for QC
    ref = meta["reference"]
    assert ref["tiles"] == 6 and ref["tiles_used"] == 6 and model.stain.qc_reference().shape == (3, 2)


def test_unstained_tiles(tmp_path, caplog):
    grey = write_tiles(tmp_path / "grey", grey=True)
    ts = load_tiles(grey, progress=False)
    model = build_model("tiny", backbone_weights="random")
    with caplog.at_level(logging.WARNING, logger="wsi_haloae.train.stain"):
        meta = setup_stain(model, ts, cfg(grey, tmp_path / "m.safetensors"), torch.device("cpu"))
    assert meta["normalize"] == "none" and meta["reference"] is None and model.stain.qc_reference() is None
    assert "training without stain normalisation" in caplog.text
    with pytest.raises(BadTilesError, match="stain-normalize macenko: only 0 of 6"):
        setup_stain(model, ts, cfg(grey, tmp_path / "m.safetensors", stain_normalize="macenko"), torch.device("cpu"))


def test_the_trained_model_file_carries_the_stain_options(tmp_path):
    tiles = write_tiles(tmp_path / "tiles")
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(main, ["train", "--tiles", str(tiles), "--out", str(out), "--preset", "tiny", "--epochs", "1",
                                  "--samples-per-epoch", "1", "--batch-size", "1", "--backbone-weights", "random",
                                  "--workers", "0", "--device", "cpu", "--stain-normalize", "reinhard",
                                  "--stain-augment", "0.1"])
    assert r.exit_code == 0, r.output
    loaded = load_model(out)
    md = loaded.metadata
    assert loaded.model.stain.method == "reinhard"
    assert md["stain"] == {"normalize": "reinhard", "requested": "reinhard", "augment": 0.1, **loaded.model.stain.describe()}
    assert md["train"]["stain_normalize"] == "reinhard" and md["train"]["stain_augment"] == 0.1
    r = CliRunner().invoke(main, ["train", "--tiles", str(tiles), "--out", str(out), "--stain-augment", "2"])
    assert r.exit_code == 2 and "stain-augment" in r.output
