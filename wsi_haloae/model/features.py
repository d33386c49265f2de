"""Frozen VGG19 feature extractor (block B): the preset's ReLU taps, each pooled to 64×64 and concatenated.

Only the ``features`` layers up to the deepest tap are built (torchvision indices, so a torchvision VGG19
state dict loads as is, keys ``features.<i>.weight``). Where its weights come from is recorded in
``backbone_info`` so a saved model says which backbone produced its features.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VGG19_TAPS
from ..errors import WeightsUnavailableError

#: torchvision's VGG19 ``features`` layout (config "E"), up to relu3_4 -- the deepest layer a preset may tap.
_VGG19_LAYOUT: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256]
#: torchvision IMAGENET1K_V1 weights (same URL and hash prefix as ``torchvision.models.VGG19_Weights``).
IMAGENET_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
IMAGENET_HASH_PREFIX = "dcbb9e9d"
#: Layer names for messages: features index of a conv -> "conv3_2".
CONV_NAMES = {0: "conv1_1", 2: "conv1_2", 5: "conv2_1", 7: "conv2_2", 10: "conv3_1", 12: "conv3_2", 14: "conv3_3", 16: "conv3_4"}
RANDOM_SEED = 0


def build_vgg_layers(last_index: int) -> nn.Sequential:
    """torchvision-layout ``features[: last_index + 1]`` (no in-place ReLUs: their outputs are tapped)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG19_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = int(v)
        if len(layers) > last_index:
            break
    return nn.Sequential(*layers[: last_index + 1])


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of tensor names, dtypes, shapes and bytes: identifies weights independently of the file format."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip_features_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision keys are ``features.<i>.weight``; ours are ``<i>.weight``. Other keys (classifier) are dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith("features."):
            out[k[len("features."):]] = v
    return out


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout VGG19 state dict from safetensors or a .pth (never unpickled: weights_only)."""
    if not path.is_file():
        raise WeightsUnavailableError(f"backbone weights {path}: file not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if path.suffix == ".safetensors" or magic not in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsUnavailableError:
        raise
    except Exception as exc:  # safetensors/pickle errors come in many types; all mean "not a weights file"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsUnavailableError(f"backbone weights {path}: not a readable state dict ({reason[:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"backbone weights {path}: not a state dict of tensors")
    return state


def imagenet_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_URL.rsplit("/", 1)[1]


def _imagenet_state() -> tuple[dict[str, torch.Tensor], Path]:
    """torchvision's IMAGENET1K_V1 VGG19 weights from the TORCH_HOME cache, else a download; fail fast offline."""
    cached = imagenet_cache_path()
    ways_out = (
        "pass --backbone-weights PATH to a torchvision VGG19 state dict (.safetensors or .pth), "
        f"put {cached.name} in {cached.parent} (TORCH_HOME), or use --backbone-weights random"
    )
    if not cached.is_file():
        try:
            socket.getaddrinfo("download.pytorch.org", 443)
            cached.parent.mkdir(parents=True, exist_ok=True)
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(30)
            try:
                torch.hub.download_url_to_file(IMAGENET_URL, str(cached), hash_prefix=IMAGENET_HASH_PREFIX, progress=False)
            finally:
                socket.setdefaulttimeout(old)
        except Exception as exc:  # offline, DNS, HTTP, hash mismatch: all mean "not available"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise WeightsUnavailableError(
                f"ImageNet VGG19 weights are not cached at {cached} and cannot be downloaded ({reason[:120]}); {ways_out}"
            ) from None
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cached ImageNet weights {cached} are unreadable ({type(exc).__name__}); delete the file; {ways_out}") from None
    return state, cached


def _random_init(layers: nn.Sequential, seed: int = RANDOM_SEED) -> None:
    """torchvision's VGG init (kaiming normal, fan_out) from a private seeded generator, each filter made DC-free.

    Why DC-free: i.i.d. random filters keep a mean (DC) component (conv1_1: ~1.5 % of a filter's energy, against
    ~0.01 % for ImageNet's conv1_1), and the input's DC dwarfs its local contrast (bright glass is ≈ +2 after
    ImageNet normalisation), so such features mostly measure brightness: tiles then rank by how much glass or
    pale tissue they hold. Subtracting each filter's mean over (in-channel, kh, kw) removes the response to a
    flat grey input while keeping edge and colour-opponent responses, like trained first-layer filters; the
    weights are then rescaled to the Kaiming std. Deterministic from ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
            with torch.no_grad():
                w = m.weight
                std = w.std()
                w -= w.mean(dim=(1, 2, 3), keepdim=True)
                w *= std / w.std()
            nn.init.zeros_(m.bias)


class VGGFeatures(nn.Module):
    """Frozen VGG19 up to the deepest tap; ``forward`` returns the (N, C, 64, 64) multi-scale feature map."""

    def __init__(self, taps: tuple[str, ...], fm_size: int = 64) -> None:
        super().__init__()
        self.taps = tuple(taps)
        self.tap_indices = sorted(VGG19_TAPS[t][0] for t in self.taps)
        self.fm_size = fm_size
        self.layers = build_vgg_layers(max(self.tap_indices))
        self.requires_grad_(False)

    @property
    def channels(self) -> int:
        return sum(VGG19_TAPS[t][1] for t in self.taps)

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)  # frozen: always in eval mode (no BN/dropout today, but stay honest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        want = set(self.tap_indices)
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in want:
                # For a 256 input the authors' "resize to 256 then 4x4 mean-pool" equals adaptive average pooling.
                outs.append(F.adaptive_avg_pool2d(x, self.fm_size))
        return torch.cat(outs, dim=1)

    # -- weights -------------------------------------------------------------------------------------------
    def load_backbone(self, weights: str | os.PathLike) -> dict:
        """Fill the layers from ``"imagenet"``, ``"random"`` or a file path; returns the ``backbone_info`` record."""
        info: dict = {"source": None, "sha256": None, "path": None, "file_sha256": None, "seed": None}
        if isinstance(weights, str) and weights == "random":
            _random_init(self.layers)
            info.update(source="random", seed=RANDOM_SEED)
        else:
            if isinstance(weights, str) and weights == "imagenet":
                state, path = _imagenet_state()
                info.update(source="imagenet", path=str(path))
                label = f"ImageNet weights {path}"
            else:
                path = Path(weights).expanduser()
                state = _read_state_file(path)
                info.update(source="file", path=str(path.resolve()), file_sha256=file_sha256(path))
                label = f"backbone weights {path}"
            self._load_partial(_strip_features_prefix(state), label)
        info["sha256"] = tensors_sha256(self.layers.state_dict())
        return info

    def _load_partial(self, state: dict[str, torch.Tensor], label: str) -> None:
        """Load the layers we build; the file may hold fewer or more layers as long as it covers ours."""
        own = self.layers.state_dict()
        for key, t in own.items():
            if key not in state:
                idx = int(key.split(".")[0])
                raise WeightsUnavailableError(
                    f"{label}: lacks layer {CONV_NAMES.get(idx, idx)} (features.{key}), needed for tap "
                    f"{max(self.taps, key=lambda n: VGG19_TAPS[n][0])}; use a file that covers it, or a preset with shallower taps"
                )
            if tuple(state[key].shape) != tuple(t.shape):
                raise WeightsUnavailableError(
                    f"{label}: features.{key} has shape {list(state[key].shape)}, VGG19 expects {list(t.shape)}"
                )
        self.layers.load_state_dict({k: state[k].to(torch.float32) for k in own}, strict=True)
