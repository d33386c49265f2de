"""HaloAE: shapes, parameter counts, backbone weights, anomaly map, determinism, post-processing."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import torch
from torch import nn

from wsi_haloae.config import ModelConfig
from wsi_haloae.errors import UserError, WeightsUnavailableError
from wsi_haloae.model import HaloAE, build_model, postprocess, tile_scores
from wsi_haloae.model.features import IMAGENET_URL, build_vgg_layers, tensors_sha256

SHARED_VGG = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")
SHARED_VGG_SHA256 = "1342166dcce64ffd12a90665f43a2f87e40121a5cde0e4b342b2215e76d23a6d"


def meta_model(preset: str) -> HaloAE:
    """The architecture without weights or compute: enough to count parameters."""
    with torch.device("meta"):
        return HaloAE(ModelConfig.preset(preset))


@pytest.fixture(scope="module")
def tiny() -> HaloAE:
    return build_model("tiny", "random").eval()


def torchvision_state(last: int, seed: int = 5) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG19 ``features.*`` state dict up to features[last]."""
    torch.manual_seed(seed)
    return {f"features.{k}": v for k, v in build_vgg_layers(last).state_dict().items()}


# -- architecture -------------------------------------------------------------------------------------------
def test_paper_parameter_count_and_structure():
    m = meta_model("paper")
    n = m.trainable_parameters()
    assert 11.0e6 <= n <= 12.8e6, n
    assert not any(p.requires_grad for p in m.features.parameters())  # frozen VGG not counted
    assert len(m.features.layers) == 18  # features[:18]: up to relu3_4, nothing deeper is built
    assert m.config.fm_channels == 704
    convs = [mod for mod in m.autoencoder.modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(c.bias is None for c in convs)
    dec_convs = [mod for mod in m.autoencoder.decoder.modules() if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(isinstance(c, nn.ConvTranspose2d) and c.stride == (1, 1) for c in dec_convs)
    up = m.autoencoder.upsample
    assert isinstance(up, nn.ConvTranspose2d) and up.groups == 704 and up.weight.numel() == 704 * 25
    assert [b.attn.heads for b in m.autoencoder.encoder] == [4, 8, 8, 8]
    assert [b.conv2.kernel_size[0] for b in m.autoencoder.decoder] == [3, 3, 3, 5, 1]


def test_preset_sizes():
    r31, tiny = meta_model("r31"), meta_model("tiny")
    assert r31.config.fm_channels == 448 and len(r31.features.layers) == 12
    assert tiny.config.fm_channels == 192 and len(tiny.features.layers) == 7
    assert tiny.trainable_parameters() < r31.trainable_parameters() < meta_model("paper").trainable_parameters()


def test_forward_shapes_train_and_eval(tiny):
    x = torch.rand(2, 3, 256, 256)
    tiny.train()
    try:
        out = tiny(x)
        assert out.fm.shape == (2, 192, 64, 64) and out.fm_hat.shape == (2, 192, 64, 64)
        assert out.image_hat.shape == (2, 3, 256, 256) and out.logits.shape == (2, 2)
        assert not out.fm.requires_grad and out.fm_hat.requires_grad
        assert tiny.autoencoder.encode(out.fm).shape == (2, 12, 60, 60)
    finally:
        tiny.eval()
    out = tiny(x[:1])
    assert out.image_hat is None and out.logits is None
    a = tiny.anomaly_map(x[:1])
    assert a.shape == (1, 64, 64) and a.dtype == torch.float32 and (a >= 0).all() and a.sum() > 0


def test_features_match_torchvision_layout(tiny):
    """Taps are torchvision VGG19 ReLU outputs (same weights) pooled to 64x64, in tap order."""
    from torchvision.models.vgg import cfgs, make_layers

    ref = make_layers(cfgs["E"])[:7].eval()
    ref.load_state_dict(tiny.features.layers.state_dict())
    x = torch.rand(1, 3, 256, 256)
    xn = tiny.normalize(x)
    with torch.no_grad():
        r11 = ref[:2](xn)
        r21 = ref[:7](xn)
        fm = tiny.extract(x)
    want = torch.cat([nn.functional.avg_pool2d(r11, 4), nn.functional.avg_pool2d(r21, 2)], dim=1)
    torch.testing.assert_close(fm, want)


def test_normalize_uses_imagenet_statistics(tiny):
    x = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert tiny.normalize(x).abs().max() < 1e-6
    assert torch.allclose(tiny.normalize(torch.ones(1, 3, 1, 1)).flatten(), (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


# -- anomaly map --------------------------------------------------------------------------------------------
class _Boom(nn.Module):
    def forward(self, *a):
        raise AssertionError("the inference path ran a training-only head")


def test_anomaly_map_zero_for_perfect_reconstruction_and_skips_training_heads():
    m = build_model("tiny", "random").eval()
    m.image_decoder = _Boom()
    m.classifier = _Boom()
    x = torch.rand(1, 3, 256, 256)
    assert m.anomaly_map(x).sum() > 0  # the untrained AE does not reconstruct
    m.autoencoder = nn.Identity()  # a perfect reconstruction
    a = m.anomaly_map(x)
    assert a.shape == (1, 64, 64) and torch.count_nonzero(a) == 0
    assert torch.count_nonzero(postprocess(a, torch.zeros(64, 64), out_size=256)) == 0


def test_anomaly_map_is_mean_squared_error_over_channels(tiny):
    x = torch.rand(1, 3, 256, 256)
    out = tiny(x)
    torch.testing.assert_close(tiny.anomaly_map(x), ((out.fm - out.fm_hat) ** 2).mean(dim=1))


def test_postprocess_matches_scipy_and_scores():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    raw = rng.random((3, 64, 64)).astype(np.float32)
    mean = rng.random((64, 64)).astype(np.float32)
    got = postprocess(raw, mean)
    assert isinstance(got, np.ndarray) and got.shape == (3, 64, 64)
    want = np.stack([gaussian_filter(np.abs(r - mean), sigma=0.8, radius=1, mode="mirror") for r in raw])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    t = postprocess(torch.from_numpy(raw), torch.from_numpy(mean), out_size=256)
    assert isinstance(t, torch.Tensor) and t.shape == (3, 256, 256)
    mean_s, max_s = tile_scores(t)
    torch.testing.assert_close(mean_s, t.flatten(1).mean(1))
    torch.testing.assert_close(max_s, t.flatten(1).amax(1))
    assert torch.count_nonzero(postprocess(torch.from_numpy(raw), torch.from_numpy(raw[1]))[1]) == 0


# -- determinism --------------------------------------------------------------------------------------------
def test_build_is_deterministic_under_a_seed():
    torch.manual_seed(123)
    a = build_model("tiny", "random", seed=7)
    torch.manual_seed(999)
    torch.rand(100)
    b = build_model("tiny", "random", seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.backbone_info == b.backbone_info and a.backbone_info["source"] == "random"
    c = build_model("tiny", "random", seed=8)
    assert not torch.equal(c.autoencoder.head[0].weight, a.autoencoder.head[0].weight)
    x = torch.rand(1, 3, 256, 256)
    assert torch.equal(a.eval().anomaly_map(x), b.eval().anomaly_map(x))


# -- backbone weights ---------------------------------------------------------------------------------------
def test_backbone_from_shared_partial_file(shared):
    path = shared(*SHARED_VGG)
    m = build_model("r31", path)
    info = m.backbone_info
    assert info["source"] == "file" and info["file_sha256"] == SHARED_VGG_SHA256 and info["path"].endswith(SHARED_VGG[1])
    from safetensors.torch import load_file

    ref = load_file(str(path))
    torch.testing.assert_close(m.features.layers[10].weight, ref["features.10.weight"])
    assert info["sha256"] == tensors_sha256(m.features.layers.state_dict())
    with pytest.raises(WeightsUnavailableError, match="conv3_2"):
        build_model("paper", path)


def test_backbone_from_pth_file_weights_only(tmp_path):
    state = torchvision_state(6)
    p = tmp_path / "vgg.pth"
    torch.save(state, p)
    m = build_model("tiny", p)
    torch.testing.assert_close(m.features.layers[5].weight, state["features.5.weight"])
    assert m.backbone_info["source"] == "file"
    shallow = tmp_path / "shallow.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("features.5.")}, shallow)
    with pytest.raises(WeightsUnavailableError, match="conv2_1"):
        build_model("tiny", shallow)


class NotWeights:  # a pickled arbitrary object: torch.load(weights_only=True) must refuse it
    pass


def test_backbone_file_errors_are_user_errors(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"x": NotWeights()}, evil)
    for bad in (evil, tmp_path / "missing.safetensors"):
        with pytest.raises(WeightsUnavailableError) as e:
            build_model("tiny", bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_imagenet_from_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints" / IMAGENET_URL.rsplit("/", 1)[1]
    cache.parent.mkdir(parents=True)
    state = torchvision_state(17)
    torch.save(state, cache)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _Boom())
    m = build_model("tiny", "imagenet")
    assert m.backbone_info["source"] == "imagenet" and m.backbone_info["path"] == str(cache)
    torch.testing.assert_close(m.features.layers[0].weight, state["features.0.weight"])


def test_imagenet_offline_fails_fast_and_clean(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def no_network(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: no_network())
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as e:
        build_model("tiny", "imagenet")
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert "random" in msg and "PATH" in msg and "TORCH_HOME" in msg


def test_random_backbone_is_seeded():
    a, b = build_model("tiny", "random"), build_model("tiny", "random")
    assert a.backbone_info["sha256"] == b.backbone_info["sha256"]
    assert torch.equal(a.features.layers[0].weight, b.features.layers[0].weight)


# -- configs and the info command ---------------------------------------------------------------------------
def test_bilinear_upsample_variant_and_bad_configs():
    import dataclasses

    from wsi_haloae.config import StageConfig
    from wsi_haloae.errors import BadInputError

    cfg = ModelConfig.preset("tiny")
    m = build_model(dataclasses.replace(cfg, upsample="bilinear"), "random").eval()
    assert m.autoencoder.upsample is None
    assert m.autoencoder(torch.rand(1, 192, 64, 64)).shape == (1, 192, 64, 64)
    bad_width = dataclasses.replace(cfg, decoder=cfg.decoder[:-1] + (StageConfig(100, 1, 1),))
    bad_head = dataclasses.replace(cfg, head_kernel=3)  # 62 is not a multiple of 12
    for bad in (bad_width, bad_head, dataclasses.replace(cfg, upsample="nearest")):
        with pytest.raises(BadInputError):
            HaloAE(bad)


def test_authors_mask_variant_round_trips_through_a_model_file(tmp_path):
    import dataclasses

    from wsi_haloae.model import load_model, save_model

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), name="tiny-authors-mask", attention="authors-mask")
    m = build_model(cfg, "random", seed=1).eval()
    ref = build_model(ModelConfig.preset("tiny"), "random", seed=1).eval()
    assert m.state_dict().keys() == ref.state_dict().keys()  # same parameters; only the attention differs
    x = torch.rand(1, 3, 256, 256)
    assert not torch.allclose(m.anomaly_map(x), ref.anomaly_map(x))
    p = save_model(tmp_path / "m.safetensors", m, torch.zeros(64, 64), {})
    loaded = load_model(p)
    assert loaded.model.config.attention == "authors-mask"
    torch.testing.assert_close(loaded.model.anomaly_map(x), m.anomaly_map(x), rtol=0, atol=0)


def test_info_command(tmp_path, tiny):
    from click.testing import CliRunner

    from wsi_haloae.cli import main
    from wsi_haloae.model import save_model

    r = CliRunner().invoke(main, ["info", "--preset", "paper"])
    assert r.exit_code == 0, r.output
    n = meta_model("paper").trainable_parameters()
    assert f"{n:,}" in r.output and "704" in r.output and "relu3_4" in r.output and "GFLOP" in r.output
    assert "attention:         halo" in r.output
    r = CliRunner().invoke(main, ["info", "--preset", "paper-authors-mask"])
    assert r.exit_code == 0 and "authors-mask" in r.output and f"{n:,}" in r.output
    p = save_model(tmp_path / "tiny.safetensors", tiny, torch.zeros(64, 64), {"epochs": 1, "mpp": 0.5})
    r = CliRunner().invoke(main, ["info", "--model", str(p)])
    assert r.exit_code == 0 and "tiny" in r.output and '"mpp": 0.5' in r.output
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    r = CliRunner().invoke(main, ["info", "--model", str(junk)])
    assert r.exit_code == 2 and "Traceback" not in r.output
