"""Model files: exact round trip, self-contained, atomic, and every kind of bad file is a one-line error."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from wsi_haloae.errors import BadModelFileError
from wsi_haloae.model import build_model, load_model, save_model
from wsi_haloae.model.checkpoint import FORMAT_NAME


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model whose BatchNorm running statistics moved (one train-mode pass), saved once."""
    torch.manual_seed(0)
    model = build_model("tiny", "random", seed=3)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 256, 256))
    model.eval()
    mean_map = torch.rand(64, 64)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_model(path, model, mean_map, {"epochs": 2, "seed": 3, "tiles": "data/", "mpp": 0.5})
    return model, mean_map, path


def _one_line(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_round_trip_is_exact(trained):
    model, mean_map, path = trained
    loaded = load_model(path)
    a, b = model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    bn = loaded.model.autoencoder.head[1]
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # running stats travelled
    assert torch.equal(loaded.mean_map, mean_map)
    assert loaded.metadata["epochs"] == 2 and loaded.metadata["mpp"] == 0.5 and loaded.metadata["tiles"] == "data/"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.model.backbone_info == model.backbone_info
    assert loaded.model.config == model.config
    assert not loaded.model.training
    x = torch.rand(1, 3, 256, 256)
    assert torch.equal(loaded.model.anomaly_map(x), model.anomaly_map(x))


def test_file_is_self_contained_and_atomic(trained, tmp_path):
    model, mean_map, _ = trained
    out = tmp_path / "sub" / "m.safetensors"
    save_model(out, model, mean_map)  # mpp unknown
    assert [p.name for p in out.parent.iterdir()] == ["m.safetensors"]  # no temp file left behind
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {"model.features.layers.0.weight", "model.features.layers.5.weight", "mean_map"} <= keys
    assert meta["format"] == FORMAT_NAME and json.loads(meta["config"])["name"] == "tiny"
    assert load_model(out).metadata["mpp"] is None
    save_model(out, model, mean_map, {"epochs": 9})  # overwrite in place
    assert load_model(out).metadata["epochs"] == 9


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    assert "not found" in _one_line(e, p)


def test_pickle_file_is_refused(tmp_path, trained):
    p = tmp_path / "model.pth"
    torch.save(trained[0].state_dict(), p)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    assert "not a safetensors" in _one_line(e, p)


def test_truncated_file(tmp_path, trained):
    data = trained[2].read_bytes()
    for cut in (4, 200, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(BadModelFileError) as e:
            load_model(p)
        _one_line(e, p)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(p))
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    assert "not a wsi-haloae model" in _one_line(e, p)


def _rewrite(src, dst, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_tensors_of_another_shape(tmp_path, trained):
    def wider_head(meta):
        cfg = json.loads(meta["config"])
        cfg["head_width"] = 64
        cfg["encoder"][0]["width"] = 64
        meta["config"] = json.dumps(cfg)

    p = _rewrite(trained[2], tmp_path / "shape.safetensors", edit_meta=wider_head)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    assert "shape" in _one_line(e, p)


def test_config_of_another_preset(tmp_path, trained):
    from wsi_haloae.config import ModelConfig

    def r31(meta):
        meta["config"] = json.dumps(ModelConfig.preset("r31").to_dict())

    p = _rewrite(trained[2], tmp_path / "r31.safetensors", edit_meta=r31)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    _one_line(e, p)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(config="{not json"),
        lambda m: m.update(config=json.dumps({"name": "x"})),
        lambda m: m.pop("config"),
        lambda m: m.update(format_version="99"),
        lambda m: m.update(format="something-else"),
    ],
)
def test_bad_metadata(tmp_path, trained, edit):
    p = _rewrite(trained[2], tmp_path / "meta.safetensors", edit_meta=edit)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    _one_line(e, p)


def test_missing_tensor_and_altered_backbone(tmp_path, trained):
    p = _rewrite(trained[2], tmp_path / "lack.safetensors", edit_tensors=lambda t: t.pop("model.autoencoder.head.0.weight"))
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    assert "lacks tensor" in _one_line(e, p)

    def alter(t):
        t["model.features.layers.0.weight"] = t["model.features.layers.0.weight"] + 1

    p = _rewrite(trained[2], tmp_path / "vgg.safetensors", edit_tensors=alter)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    assert "backbone" in _one_line(e, p)


def test_header_length_garbage(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(struct.pack("<Q", 20) + b"\xff" * 20 + b"\x00" * 8)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    _one_line(e, p)


def test_save_refuses_bad_input(tmp_path, trained):
    model, mean_map, _ = trained
    with pytest.raises(ValueError):
        save_model(tmp_path / "m.safetensors", model, torch.zeros(32, 32))
    with pytest.raises(ValueError):
        save_model(tmp_path / "m.safetensors", model, mean_map, {"bad": object()})
    assert not any(tmp_path.iterdir())
