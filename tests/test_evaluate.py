"""Evaluation end to end: train a tiny model for a few steps, evaluate it on a synthetic MVTec-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from skimage.data import immunohistochemistry
from skimage.draw import disk
from sklearn.metrics import roc_auc_score

from wsi_haloae.cli import main
from wsi_haloae.config import TrainConfig
from wsi_haloae.errors import BadInputError, BadTilesError
from wsi_haloae.evaluate import run_evaluate

SIZE = 300  # test images are not 256: exercises resizing for the model and up-sampling back for the pixels


def write_mvtec(root: Path) -> Path:
    """test/good (3), test/stain (3, one with two regions), ground_truth/stain/*_mask.png — real IHC texture."""
    im = immunohistochemistry()
    rng = np.random.default_rng(0)
    for sub in ("test/good", "test/stain", "ground_truth/stain"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        y, x = 20 + 60 * i, 200 - 50 * i
        Image.fromarray(im[y : y + SIZE, x : x + SIZE]).save(root / "test" / "good" / f"{i:03d}.png")
    for i in range(3):
        y, x = 200 - 70 * i, 10 + 60 * i
        img = im[y : y + SIZE, x : x + SIZE].copy()
        mask = np.zeros((SIZE, SIZE), bool)
        for _ in range(1 + (i == 2)):
            rr, cc = disk((rng.integers(60, 240), rng.integers(60, 240)), 28, shape=mask.shape)
            mask[rr, cc] = True
        # a blot of coarse green/magenta noise: texture and colours the training tiles never show
        noise = rng.integers(0, 2, size=(SIZE // 4, SIZE // 4, 1)).repeat(4, 0).repeat(4, 1)
        blot = np.where(noise, np.array([20, 200, 40]), np.array([230, 20, 230])).astype(np.uint8)
        img[mask] = blot[mask]
        Image.fromarray(img).save(root / "test" / "stain" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / "stain" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    root = write_mvtec(tmp_path_factory.mktemp("mvtec") / "ihc")
    tiles = root / "train" / "good"
    tiles.mkdir(parents=True)
    im = immunohistochemistry()
    for i in range(6):
        y, x = (i // 3) * 250, (i % 3) * 120
        Image.fromarray(im[y : y + 256, x : x + 256]).save(tiles / f"t{i}.png")
    return root


@pytest.fixture(scope="module")
def model(mvtec, tmp_path_factory) -> Path:
    from wsi_haloae.train.trainer import run_train

    out = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    cfg = TrainConfig(tiles=mvtec, out=out, preset="tiny", epochs=1, samples_per_epoch=2, batch_size=1,
                      backbone_weights="random", workers=0, device="cpu", seed=0)
    return run_train(cfg)


def test_json_on_stdout_and_report(model, mvtec, tmp_path, caplog):
    report = tmp_path / "report"
    r = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--data", str(mvtec), "--json", "--report", str(report), "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.count("\n") == 1
    res = json.loads(r.stdout)
    assert set(res) == {"image_auroc", "image_auroc_max", "pixel_auroc", "aupro", "n_images", "n_anomalous", "alpha",
                        "calibration_n", "fpr_at_alpha", "tpr_at_alpha", "called_good", "called_defect",
                        "tpr_at_alpha_per_defect"}
    assert res["n_images"] == 6 and res["n_anomalous"] == 3
    # 6 training images: too few to hold out 20, so no calibration and calibrated figures are n/a, with a warning
    assert res["calibration_n"] is None and res["fpr_at_alpha"] is None and res["tpr_at_alpha"] is None
    assert "has no calibration" in caplog.text
    for k in ("image_auroc", "image_auroc_max", "pixel_auroc", "aupro"):
        assert 0.0 <= res[k] <= 1.0
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == [f"{d}_{i:03d}.png" for d in ("good", "stain") for i in range(3)]
    w, h = Image.open(report / "stain_002.png").size
    assert h == 320 and w == 3 * 320 + 12
    page = (report / "index.html").read_text()
    assert all(p in page for p in pngs) and "pixel_auroc" in page


def test_figures_match_an_independent_computation(model, mvtec, capsys):
    """Recompute every figure from the model directly: full-resolution maps, sklearn ROC, hand-picked images."""
    from wsi_haloae.metrics import aupro
    from wsi_haloae.model import load_model, postprocess, tile_scores

    res = run_evaluate(model=model, data=mvtec, as_json=True, report=None, device="cpu", batch_size=4)
    assert json.loads(capsys.readouterr().out) == res

    lm = load_model(model)
    maps, masks, labels, means, maxes = [], [], [], [], []
    for defect in ("good", "stain"):
        for i in range(3):
            img = Image.open(mvtec / "test" / defect / f"{i:03d}.png").convert("RGB")
            x = torch.from_numpy(np.array(img.resize((256, 256), Image.BILINEAR))).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                raw = lm.model.anomaly_map(x)
            full = postprocess(raw, lm.mean_map, out_size=SIZE)[0].numpy()
            mean, mx = tile_scores(postprocess(raw, lm.mean_map))
            maps.append(full)
            means.append(float(mean[0]))
            maxes.append(float(mx[0]))
            labels.append(int(defect != "good"))
            m = mvtec / "ground_truth" / "stain" / f"{i:03d}_mask.png"
            masks.append(np.asarray(Image.open(m)) > 127 if defect != "good" else np.zeros((SIZE, SIZE), bool))
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels, means), abs=1e-9)
    assert res["image_auroc_max"] == pytest.approx(roc_auc_score(labels, maxes), abs=1e-9)
    pix = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert res["pixel_auroc"] == pytest.approx(pix, abs=1e-6)
    assert res["aupro"] == pytest.approx(aupro(maps, masks), abs=1e-6)


def test_calibrated_calls_match_the_pvalues_of_the_image_scores(model, mvtec, tmp_path, capsys):
    """With a calibration, each image is called when its conformal p-value is <= 0.05: FPR on good, TPR on defects."""
    from wsi_haloae.model import load_model, postprocess, tile_scores
    from wsi_haloae.model.checkpoint import rewrite_metadata
    from wsi_haloae.scoring import Calibration

    lm = load_model(model)
    scores, labels = [], []
    for defect in ("good", "stain"):
        for i in range(3):
            img = Image.open(mvtec / "test" / defect / f"{i:03d}.png").convert("RGB")
            x = torch.from_numpy(np.array(img.resize((256, 256), Image.BILINEAR))).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                scores.append(float(tile_scores(postprocess(lm.model.anomaly_map(x), lm.mean_map))[0][0]))
            labels.append(defect != "good")
    scores_a = np.array(scores)
    # 39 calibration scores spread over the images' range: some images fall above all but one of them (called)
    cal_scores = np.linspace(scores_a.min() - 1e-6, np.median(scores_a), 39)
    cal = Calibration.from_scores(cal_scores, np.linspace(0, 1, 100), {"tiles": "t"}, mean_map=lm.mean_map.numpy())
    calibrated = rewrite_metadata(model, tmp_path / "cal.safetensors", {"calibration": cal.to_dict()})
    res = run_evaluate(model=calibrated, data=mvtec, as_json=True, report=tmp_path / "rep", device="cpu", batch_size=4)
    capsys.readouterr()
    p = np.array([(1 + np.sum(cal.scores >= s)) / 40 for s in np.float32(scores_a).astype(float)])
    called = p <= 0.05
    lab = np.array(labels)
    assert 0 < called.sum() < 6  # the check can tell right from wrong
    assert res["calibration_n"] == 39 and res["alpha"] == 0.05
    assert res["fpr_at_alpha"] == pytest.approx(called[~lab].mean()) and res["called_good"] == called[~lab].sum()
    assert res["tpr_at_alpha"] == pytest.approx(called[lab].mean()) and res["called_defect"] == called[lab].sum()
    assert res["tpr_at_alpha_per_defect"] == {"stain": pytest.approx(called[lab].mean())}
    lo, hi = cal.display_range
    assert f"{lo:.4g}" in (tmp_path / "rep" / "index.html").read_text()  # the report's colours use the calibration


def test_table_on_stdout(model, mvtec, capsys):
    run_evaluate(model=model, data=mvtec, as_json=False, report=None, device="cpu", batch_size=8)
    out = capsys.readouterr().out
    assert "pixel AUROC" in out and "AUPRO" in out and "6 (3 anomalous)" in out
    assert "false-positive rate on good" in out and "n/a: the model has no calibration" in out


def test_bad_inputs(model, mvtec, tmp_path):
    with pytest.raises(BadTilesError, match="does not exist"):
        run_evaluate(model, tmp_path / "nope", True, None, "cpu", 4)
    (tmp_path / "flat").mkdir()
    with pytest.raises(BadTilesError, match="no test/ folder"):
        run_evaluate(model, tmp_path / "flat", True, None, "cpu", 4)
    (tmp_path / "emptytest" / "test" / "good").mkdir(parents=True)
    with pytest.raises(BadTilesError, match="no test images"):
        run_evaluate(model, tmp_path / "emptytest", True, None, "cpu", 4)
    nomask = write_mvtec(tmp_path / "nomask")
    (nomask / "ground_truth" / "stain" / "001_mask.png").unlink()
    with pytest.raises(BadInputError, match="001_mask.png is missing"):
        run_evaluate(model, nomask, True, None, "cpu", 4)
    badmask = write_mvtec(tmp_path / "badmask")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(badmask / "ground_truth" / "stain" / "000_mask.png")
    with pytest.raises(BadInputError, match="mask is 10x10"):
        run_evaluate(model, badmask, True, None, "cpu", 4)


def test_cli_errors_are_one_line(mvtec, tmp_path):
    fake = tmp_path / "model.pth"
    fake.write_bytes(b"\x80\x02}q\x00." + b"\0" * 64)  # a pickle
    runner = CliRunner()
    for args in (
        ["evaluate", "--model", str(fake), "--data", str(mvtec), "--json"],
        ["evaluate", "--model", str(fake), "--data", str(tmp_path / "nope"), "--json"],
    ):
        r = runner.invoke(main, args)
        assert r.exit_code == 2 and r.stdout == ""
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


def test_real_mvtec_bottle_layout(shared):
    """The real MVTec AD bottle category (../shared) is read as its official split: 83 test images, 63 defective."""
    from wsi_haloae.evaluate import find_test_set
    from wsi_haloae.train.data import find_images, tile_root

    bottle = shared("mvtec_ad", "bottle")
    items = find_test_set(bottle)
    assert len(items) == 83 and sum(it.anomalous for it in items) == 63
    assert {it.defect for it in items} == {"good", "broken_large", "broken_small", "contamination"}
    assert all(it.mask is not None and it.mask.is_file() for it in items if it.anomalous)
    assert len(find_images(tile_root(bottle))) == 209


def test_the_model_files_stain_normaliser_runs_on_every_test_image(mvtec, tmp_path, monkeypatch, capsys):
    """evaluate applies the model's own stain normalisation (it lives inside the model): a model file with a
    Macenko reference normalises all 6 test images, and its figures differ from the same weights without it."""
    from wsi_haloae.model import build_model
    from wsi_haloae.model.checkpoint import save_model
    from wsi_haloae.model.stain import StainNormalizer, fit_reference

    tiles = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                         for p in sorted((mvtec / "train" / "good").glob("*.png"))])
    net = build_model("tiny", backbone_weights="random", seed=0)
    plain = save_model(tmp_path / "plain.safetensors", net, torch.zeros(64, 64), {})
    net.stain.set_reference("macenko", fit_reference([tiles]))
    normalised = save_model(tmp_path / "macenko.safetensors", net, torch.zeros(64, 64), {})

    seen: list[tuple[str, int]] = []
    forward = StainNormalizer.forward

    def spy(self, x):
        seen.append((self.method, int(x.shape[0])))
        return forward(self, x)

    monkeypatch.setattr(StainNormalizer, "forward", spy)
    with_norm = run_evaluate(model=normalised, data=mvtec, as_json=True, device="cpu", batch_size=4)
    assert [m for m, _ in seen] == ["macenko", "macenko"] and sum(n for _, n in seen) == 6
    seen.clear()
    without = run_evaluate(model=plain, data=mvtec, as_json=True, device="cpu", batch_size=4)
    assert {m for m, _ in seen} == {"none"} and sum(n for _, n in seen) == 6
    capsys.readouterr()
    assert with_norm["pixel_auroc"] != without["pixel_auroc"]
