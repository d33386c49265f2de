"""A planted anomaly scores higher, where it was planted, through the whole ``infer`` pipeline.

The model is a real tiny HaloAE with the offline ImageNet VGG19 weights (../shared/data/vgg-imagenet-weights,
conv1_1..conv3_1: enough for the tiny preset's relu1_1 + relu2_1 taps) and a seeded, untrained auto-encoder.
Its mean map is the real training mean map: the average raw anomaly map over *normal* tiles, rendered from
the anomaly-free twin of the test slide at grid offsets the test grid never uses. Why not a trained model:
a few CPU training steps do not change the picture (measured: tile AUROC 0.94 before and after 10 steps),
while minutes of training would not fit the suite. What this checks is the inference side: that the slide
is read at the model's mpp, maps are post-processed against the stored mean map, and scores land on the
planted region (tile AUROC and pixel AUROC against the ground-truth mask). With a random backbone the same
pipeline does *not* separate this anomaly (AUROC ~0.5), which is why the test needs real features and
skips without them.
"""

from __future__ import annotations

import numpy as np
import torch

from conftest import shared_path
from wsi_haloae.config import InferConfig, InferOptions
from wsi_haloae.infer import writers
from wsi_haloae.infer.engine import run_infer
from wsi_haloae.slide.synthetic import GLASS, SyntheticSlideSpec, anomaly_mask, render_region


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def test_planted_anomaly_scores_higher_there(synthetic_slide, tmp_path):
    weights = shared_path("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")
    from wsi_haloae.model import build_model, save_model

    spec = SyntheticSlideSpec.default(width=2048, height=2048, mpp=0.5)  # what conftest's synthetic_slide holds
    twin = SyntheticSlideSpec.default(width=2048, height=2048, mpp=0.5, anomaly=False)
    normal = []
    for oy, ox in ((128, 64), (128, 192)):
        for y in range(oy, 2048 - 256, 256):
            for x in range(ox, 2048 - 256, 256):
                img = render_region(twin, x, y, 256, 256)
                if (img != GLASS).any(-1).mean() >= 0.5:
                    normal.append(img)
    assert len(normal) >= 10
    model = build_model("tiny", backbone_weights=weights, seed=0).eval()
    x = torch.from_numpy(np.stack(normal)).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        mean_map = torch.cat([model.anomaly_map(x[i:i + 8]) for i in range(0, len(x), 8)]).mean(0)
    path = save_model(tmp_path / "tiny-imagenet.safetensors", model, mean_map, {"mpp": 0.5})

    cfg = InferConfig(slide=synthetic_slide, model=path, out=tmp_path / "o.zarr",
                      options=InferOptions(workers=0, batch_size=8, device="cpu", progress=False))
    run_infer(cfg)
    g = writers.open_store(cfg.out)
    xy, scores = g["tiles/xy"][:], g["tiles/score_mean"][:]
    frac = np.array([anomaly_mask(spec, int(a), int(b), 64, 64, downsample=4).mean() for a, b in xy])
    lab = frac >= 0.25
    assert 3 <= lab.sum() < len(lab)
    tile_auc = _auroc(scores, lab)
    assert scores[lab].mean() > 1.3 * scores[~lab].mean()
    assert tile_auc >= 0.85, (tile_auc, scores, frac)
    assert lab[np.argmax(scores)]  # the highest-scoring tile is on the anomaly
    # pixel level: the map itself is high on the ground-truth mask (map pixel = 4 slide pixels). The map is
    # NaN off tissue, so this is tissue against tissue: 0.786 measured (0.788 on the tiles with >= 0.5 tissue
    # alone; >= 0.8 before glass was NaN'd, when the scored tiles' glass counted as easy negatives)
    heat = g["0"][:]
    truth = anomaly_mask(spec, 0, 0, heat.shape[1], heat.shape[0], downsample=4)
    ok = np.isfinite(heat)
    pixel_auc = _auroc(heat[ok], truth[ok])
    assert pixel_auc >= 0.75, pixel_auc
