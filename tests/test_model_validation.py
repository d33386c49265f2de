"""A lying model file (issue 13, case 4): its config and metadata are checked before anything is built.

Each bad file must end in one line, exit 2, leave its inputs byte-identical and write nothing; a config out
of bounds must never reach a module constructor (it once allocated > 4 GB in ``info --model``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from checks import one_line_error, sha256
from wsi_haloae.cli import main
from wsi_haloae.config import MAX_MODEL_ELEMENTS, MODEL_BOUNDS, MPP_RANGE, Count, Int, ModelConfig, OneOf, StageConfig, Text
from wsi_haloae.errors import BadInputError, BadModelFileError
from wsi_haloae.model import build_model, load_model, save_model
from wsi_haloae.model import checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    model = build_model("tiny", "random", seed=1)
    return save_model(tmp_path_factory.mktemp("good") / "model.safetensors", model, torch.zeros(64, 64), {"mpp": 0.5})


def _rewrite(src: Path, dst: Path, config=None, metadata=None, tensors=None) -> Path:
    """A copy of ``src`` whose config / caller metadata / tensors were edited in place by the callables."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    if config:
        c = json.loads(meta["config"])
        replaced = config(c)  # edits in place, or returns a replacement
        meta["config"] = json.dumps(c if replaced is None else replaced)
    if metadata:
        u = json.loads(meta["metadata"])
        metadata(u)
        meta["metadata"] = json.dumps(u)
    if tensors:
        tensors(ts)
    save_file(ts, str(dst), metadata=meta)
    return dst


def _one_line_exit_2(args: list[str]) -> str:
    return one_line_error(CliRunner().invoke(main, args))


LIES = {
    "head_width 200000": (dict(config=lambda c: c.update(head_width=200000)), "head_width 200000 is outside"),
    "head_width 1e9": (dict(config=lambda c: c.update(head_width=10**9)), "head_width 1000000000 is outside"),
    "head_width -5": (dict(config=lambda c: c.update(head_width=-5)), "head_width -5 is outside"),
    "head_width '48'": (dict(config=lambda c: c.update(head_width="48")), "head_width '48' is not a whole number"),
    "heads 0": (dict(config=lambda c: c["encoder"][1].update(heads=0)), "encoder[1].heads 0 is outside"),
    "even kernel": (dict(config=lambda c: c["decoder"][0].update(kernel=4)), "decoder[0].kernel 4 is even"),
    "dim_head 1e6": (dict(config=lambda c: c.update(dim_head=10**6)), "dim_head 1000000 is outside"),
    "block 0": (dict(config=lambda c: c.update(block=0)), "block 0 is outside"),
    "halo -1": (dict(config=lambda c: c.update(halo=-1)), "halo -1 is outside"),
    "tile 1e5": (dict(config=lambda c: c.update(tile_size=100000)), "tile_size 100000 is outside"),
    "fm_size 5": (dict(config=lambda c: c.update(fm_size=5)), "fm_size 5 is outside"),
    "unknown tap": (dict(config=lambda c: c.update(taps=["relu9_9"])), "taps[0] 'relu9_9' is not one of"),
    "taps a string": (dict(config=lambda c: c.update(taps="relu1_1")), "taps 'relu1_1' is not a list"),
    "upsample": (dict(config=lambda c: c.update(upsample="nearest")), "upsample 'nearest' is not one of"),
    "no stages": (dict(config=lambda c: c.update(encoder=[])), "encoder has 0 entries"),
    "config a list": (dict(config=lambda c: [c]), "model config: not a JSON object (list)"),
    "unknown key": (dict(config=lambda c: c.update(attention="flash")), "unknown keys ['attention']"),
    "mpp 'abc'": (dict(metadata=lambda u: u.update(mpp="abc")), "metadata mpp 'abc' is not a number"),
    "mpp -1": (dict(metadata=lambda u: u.update(mpp=-1)), "metadata mpp -1 is outside the plausible range"),
    "mpp 0.001": (dict(metadata=lambda u: u.update(mpp=0.001)), "metadata mpp 0.001 is outside the plausible range"),
    "mpp nan": (dict(metadata=lambda u: u.update(mpp=float("nan"))), "metadata mpp nan is outside"),
    "mpp true": (dict(metadata=lambda u: u.update(mpp=True)), "metadata mpp True is not a number"),
    "tensor shape": (dict(tensors=lambda t: t.update({"model.autoencoder.head.0.weight": torch.zeros(48, 192, 5, 4)})),
                     "tensor 'autoencoder.head.0.weight' has shape [48, 192, 5, 4], config 'tiny' expects [48, 192, 5, 5]"),
    "tensor dtype": (dict(tensors=lambda t: t.update({"model.autoencoder.head.0.weight": torch.zeros(48, 192, 5, 5, dtype=torch.float64)})),
                     "tensor 'autoencoder.head.0.weight' is F64, config 'tiny' expects F32"),
    "mean map shape": (dict(tensors=lambda t: t.update(mean_map=torch.zeros(10**3, 10**3))), "mean map has shape [1000, 1000]"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_lying_model_file_is_refused_before_any_module_is_built(good, tmp_path, case, monkeypatch):
    edits, expected = LIES[case]
    p = _rewrite(good, tmp_path / "lying.safetensors", **edits)
    built: list[str] = []
    real = checkpoint.HaloAE

    def spy(cfg):
        built.append(str(torch.get_default_device()))
        return real(cfg)

    monkeypatch.setattr(checkpoint, "HaloAE", spy)
    before = sha256(p)
    with pytest.raises(BadModelFileError) as e:
        load_model(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and expected in msg, msg
    assert all(d == "meta" for d in built), built  # nothing built for real, only shapes on the meta device
    if "tensor" not in case and "mean map" not in case:
        assert built == []  # config and metadata are refused before even the meta build
    assert sha256(p) == before


@pytest.mark.parametrize("case", ["head_width 200000", "mpp 'abc'", "mpp -1"])
def test_info_names_the_lie_in_one_line(good, tmp_path, case):
    edits, expected = LIES[case]
    p = _rewrite(good, tmp_path / "lying.safetensors", **edits)
    before = sha256(p)
    err = _one_line_exit_2(["info", "--model", str(p)])
    assert expected in err and "--mpp" not in err  # the user gave no --mpp: never blame it
    assert sha256(p) == before


@pytest.mark.parametrize("case", ["mpp 0.001", "mpp 'abc'", "head_width 1e9"])
def test_infer_and_evaluate_refuse_a_lying_model_and_write_nothing(good, tmp_path, synthetic_slide, case):
    edits, expected = LIES[case]
    model = _rewrite(good, tmp_path / "lying.safetensors", **edits)
    before = {p: sha256(p) for p in (model, synthetic_slide)}
    out = tmp_path / "out.zarr"
    err = _one_line_exit_2(["infer", str(synthetic_slide), "--model", str(model), "--out", str(out), "--device", "cpu"])
    assert expected in err
    data = tmp_path / "mvtec"
    (data / "test" / "good").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 100, 150)).save(data / "test" / "good" / "a.png")
    assert expected in _one_line_exit_2(["evaluate", "--model", str(model), "--data", str(data), "--device", "cpu",
                                         "--report", str(tmp_path / "report")])
    assert {p: sha256(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lying.safetensors", "mvtec"]  # no store, no report


def test_model_over_the_element_budget_is_refused_on_the_meta_device(good, tmp_path, monkeypatch):
    """Every field within bounds, the whole too big: counted from the config, never allocated."""
    monkeypatch.setattr(checkpoint, "MAX_MODEL_ELEMENTS", 500_000)  # the tiny model holds 955k
    with pytest.raises(BadModelFileError, match=r"tensor elements, more than the 500,000"):
        load_model(good)


def test_every_config_field_has_a_bound_and_every_bound_bites():
    """New ModelConfig fields must join MODEL_BOUNDS; each bound, pushed one past its end, is refused."""
    top = {k.split(".")[0].removesuffix("[]") for k in MODEL_BOUNDS}
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= top
    stage = {k.split(".")[1] for k in MODEL_BOUNDS if k.startswith("encoder[].")}
    assert {f.name for f in dataclasses.fields(StageConfig)} <= stage
    base = ModelConfig.preset("tiny").to_dict()
    for path, bound in MODEL_BOUNDS.items():
        if isinstance(bound, Int):
            bad_values = [bound.lo - 1, bound.hi + 1, 1.5, None]
        elif isinstance(bound, Count):
            bad_values = [[], "x"] if bound.lo > 0 else ["x"]
        elif isinstance(bound, OneOf):
            bad_values = ["not-a-choice", 3]
        else:
            assert isinstance(bound, Text)
            bad_values = ["x" * (bound.max_len + 1), 7]
        for bad in bad_values:
            d = json.loads(json.dumps(base))
            parts = path.split(".")
            target = d
            for part in parts[:-1]:
                target = target[part.removesuffix("[]")][0]
            last = parts[-1]
            if last.endswith("[]"):
                target[last[:-2]][0] = bad
            else:
                target[last] = bad
            with pytest.raises(BadInputError, match="model config"):
                ModelConfig.from_dict(d)


def test_presets_pass_their_own_bounds():
    for name in ("paper", "r31", "tiny"):
        cfg = ModelConfig.preset(name)
        elements = sum(__import__("math").prod(s) for _, s in checkpoint.expected_tensors(cfg).values())
        assert elements < MAX_MODEL_ELEMENTS / 5, (name, elements)


def test_mpp_range_is_the_documented_one():
    assert MPP_RANGE == (0.05, 100.0)


def test_preset_files_are_validated_too(tmp_path):
    bad = tmp_path / "wide.json"
    d = ModelConfig.preset("tiny").to_dict()
    d["head_width"] = 200000
    bad.write_text(json.dumps(d))
    assert "head_width 200000 is outside 1..2048" in _one_line_exit_2(["info", "--preset", str(bad)])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "not readable JSON" in _one_line_exit_2(["info", "--preset", str(broken)])
