"""benchmarks/learning_curve.py and benchmarks/padim.py: a quick run end to end, its scores equal ``evaluate``'s,
and PaDiM's Mahalanobis maps are what they claim. No ../shared needed (IHC tiles from scikit-image, random
seeded backbone); figures are not asserted, only that they are computed, complete and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("lc")
    out = tmp / "results" / "learning_curve-tiny-tissue-quick.json"
    cmd = [sys.executable, str(BENCH / "learning_curve.py"), "--quick", "--out", str(out), "--workdir", str(tmp / "work")]
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[0].startswith("# python benchmarks/learning_curve.py --quick")
    return json.loads(out.read_text()), tmp


def test_quick_run_scores_every_checkpoint_and_padim(quick_run):
    import planted

    run, _ = quick_run
    assert run["complete"] and run["quick"]
    assert [c["step"] for c in run["checkpoints"]] == [0, 1, 2]
    # one schedule, continued: step 2 resumed the resume file that step 1 left
    assert run["checkpoints"][2]["resumed"] is True
    assert run["checkpoints"][1]["step_cpu_s"] > 0 and run["checkpoints"][2]["train_cpu_s_cum"] > run["checkpoints"][1]["train_cpu_s_cum"]
    for entry in [run["padim"], *run["checkpoints"]]:
        assert set(entry["per_kind"]) == set(planted.KINDS)
        for k, f in entry["per_kind"].items():
            assert 0 <= f["image_auroc"] <= 1 and 0 <= f["pixel_auroc"] <= 1 and f["n"] == 2, k
        assert 0 <= entry["pixel_auroc"] <= 1 and 0 <= entry["aupro"] <= 1
        assert len(entry["images"]) == run["data"]["n_test"]
    assert run["padim"]["dims"] == 16 and len(run["padim"]["channels"]) == 16
    assert [m["step"] for m in run["checkpoints"][2]["epochs_metrics"]] == [2]
    assert np.isfinite(run["checkpoints"][2]["reconstruction"]["r2"])


def test_scores_equal_evaluate(quick_run, capsys):
    """The harness's figures for a checkpoint are exactly what ``wsi-haloae evaluate`` reports for it."""
    from wsi_haloae.evaluate import run_evaluate

    run, _ = quick_run
    last = run["checkpoints"][-1]
    ref = run_evaluate(Path(last["model"]), Path(run["data"]["root"]), as_json=True, device="cpu")
    capsys.readouterr()
    for key in ("image_auroc", "image_auroc_max", "pixel_auroc", "aupro"):
        assert last[key] == pytest.approx(ref[key], abs=1e-9), key


def test_report_draws_figures_and_table(quick_run):
    run, tmp = quick_run
    res = tmp / "results"
    p = subprocess.run([sys.executable, str(BENCH / "learning_curve.py"), "--report", "--include-quick", "--results", str(res)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("learning_curve-tissue.png", "learning_curve-losses.png", "learning_curve.md"):
        assert (res / name).stat().st_size > 0, name
    assert "| PaDiM d=16 |" in p.stdout and p.stdout.count("| HaloAE | ") == 3


def test_bn_refresh_rescores_checkpoints_and_the_report_shows_them(quick_run):
    """--bn-refresh re-scores saved checkpoints as train now finishes a model (BatchNorm statistics and mean map
    recomputed; it exists for curves measured before the trainer did so). This quick run's checkpoints come from
    today's trainer, which already refreshed them: re-scoring must give exactly their figures (the refresh is a
    deterministic pass over the same tiles, the mean map follows from it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run, tmp = quick_run
    res = tmp / "results"
    # give step 0's checkpoint the init running statistics (mean 0, variance 1), as the trainer before the
    # refresh left it: only a real refresh brings its figures back
    ck = tmp / "work" / "tiny-tissue-quick" / "checkpoints" / "step-000000.safetensors"
    with safe_open(str(ck), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    stats = [k for k in tensors if k.endswith(("running_mean", "running_var"))]
    assert stats
    for k in stats:
        tensors[k] = torch.zeros_like(tensors[k]) if k.endswith("mean") else torch.ones_like(tensors[k])
    save_file(tensors, str(ck), metadata=meta)
    cmd = [sys.executable, str(BENCH / "learning_curve.py"), "--quick", "--out", str(res / "learning_curve-tiny-tissue-quick.json"),
           "--workdir", str(tmp / "work"), "--bn-refresh", "ends"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    bn = json.loads((res / "bn_refresh-tiny-tissue-quick.json").read_text())
    assert [c["step"] for c in bn["checkpoints"]] == [0, 2] and bn["of"] == "learning_curve-tiny-tissue-quick.json"
    before = {c["step"]: c for c in run["checkpoints"]}
    for c in bn["checkpoints"]:
        assert c["bn_tiles"] == run["data"]["n_train"] and 0 <= c["pixel_auroc"] <= 1 and 0 <= c["aupro"] <= 1
        assert len(c["images"]) == run["data"]["n_test"]
        for key in ("image_auroc", "image_auroc_max", "pixel_auroc", "aupro"):
            assert c[key] == pytest.approx(before[c["step"]][key], abs=1e-9), (c["step"], key)
        assert c["reconstruction"]["r2"] == pytest.approx(before[c["step"]]["reconstruction"]["r2"], rel=1e-6)
    # a second call has nothing left to do; a step never scored is refused in one line
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "+ BN refresh" not in again.stdout
    bad = subprocess.run(cmd[:-1] + ["5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "steps must be among the scored ones [0, 1, 2]" in bad.stderr
    rep = subprocess.run([sys.executable, str(BENCH / "learning_curve.py"), "--report", "--include-quick", "--results", str(res)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and rep.stdout.count("| HaloAE + BN refresh | ") == 2


def test_padim_is_a_mahalanobis_distance():
    from padim import PaDiM
    from skimage.data import immunohistochemistry

    img = torch.from_numpy(np.asarray(immunohistochemistry())[..., :3].copy()).permute(2, 0, 1).float() / 255
    tiles = torch.stack([img[:, y : y + 256, x : x + 256] for y in (0, 64, 128, 192, 256) for x in (0, 128)])
    pd = PaDiM("tiny", "random", dims=8, seed=0).fit([tiles[:6], tiles[6:]])
    assert pd.channels.tolist() == sorted(set(pd.channels.tolist())) and len(pd.channels) == 8
    test = tiles[:2].clone()
    test[1, :, 60:140, 60:140] = torch.tensor([0.1, 0.6, 0.2]).view(3, 1, 1)  # a green patch
    raw = pd.raw_map(test)
    # the definition, for one position, by hand (float64, scipy)
    from scipy.spatial.distance import mahalanobis

    emb = pd.embed(test).double().numpy()
    p = 25 * 64 + 25
    d = mahalanobis(emb[1, p], pd.mean[p].double().numpy(), pd.precision[p].double().numpy())
    assert raw[1].flatten()[p].item() == pytest.approx(d, rel=1e-3)
    # the patch stands out where it is, and not in the untouched tile
    inside = raw[1, 18:32, 18:32].mean()
    assert inside > 3 * raw[0, 18:32, 18:32].mean()
    pp = pd.map(test)
    assert pp.shape == (2, 64, 64) and pp[1].mean() > pp[0].mean()
