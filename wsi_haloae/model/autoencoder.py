"""The HaloNet auto-encoder (block C), the image reconstructor (block D) and the classifier (block E).

Stride 1 throughout; bias-free convolutions each followed by BatchNorm. The decoder repeats the encoder's
block with transposed convolutions (stride 1, so shapes match the encoder's). The head's 5×5 valid conv takes
the 64×64 feature map to 60×60 (a multiple of the attention block 12); at the end a depthwise 5×5 transposed
conv (17.6k parameters for 704 channels) takes it back to 64×64 -- the authors resize with nearest neighbour;
a full 704→704 transposed conv would cost 12.4M parameters and ~45 GFLOP per tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ATTENTION_MODES, ModelConfig, StageConfig
from ..errors import BadInputError
from .halo import HaloAttention


def _conv(cin: int, cout: int, k: int, transposed: bool) -> nn.Module:
    if transposed:
        return nn.ConvTranspose2d(cin, cout, k, stride=1, padding=k // 2, bias=False)
    return nn.Conv2d(cin, cout, k, stride=1, padding=k // 2, bias=False)


class HaloBlock(nn.Module):
    """1×1 conv → BN → ReLU → halo attention → ReLU → k×k conv → BN, plus a residual; then ReLU.

    The residual is the identity when widths agree, else a 1×1 (transposed) conv + BN.
    """

    def __init__(self, cin: int, stage: StageConfig, cfg: ModelConfig, transposed: bool) -> None:
        super().__init__()
        cout = stage.width
        self.conv1 = _conv(cin, cout, 1, transposed)
        self.bn1 = nn.BatchNorm2d(cout)
        mask = "authors" if cfg.attention == "authors-mask" else "halo"
        self.attn = HaloAttention(cout, stage.heads, dim_head=cfg.dim_head, block=cfg.block, halo=cfg.halo, mask=mask)
        self.conv2 = _conv(cout, cout, stage.kernel, transposed)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = (
            nn.Identity() if cin == cout else nn.Sequential(_conv(cin, cout, 1, transposed), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.attn(y))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class HaloAutoEncoder(nn.Module):
    """fm (N, C, 64, 64) → bottleneck (N, 29, 60, 60) → f̂m (N, C, 64, 64)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c = cfg.fm_channels
        if cfg.attention not in ATTENTION_MODES:
            raise BadInputError(f"model config {cfg.name!r}: unknown attention {cfg.attention!r} ({' | '.join(ATTENTION_MODES)})")
        if cfg.decoder[-1].width != c:
            raise BadInputError(f"model config {cfg.name!r}: last decoder width {cfg.decoder[-1].width} != fm channels {c}")
        inner = cfg.fm_size - cfg.head_kernel + 1
        if inner <= 0 or inner % cfg.block:
            raise BadInputError(f"model config {cfg.name!r}: head output {inner}x{inner} is not a multiple of block {cfg.block}")
        self.head = nn.Sequential(nn.Conv2d(c, cfg.head_width, cfg.head_kernel, padding=0, bias=False), nn.BatchNorm2d(cfg.head_width), nn.ReLU())
        enc: list[nn.Module] = []
        w = cfg.head_width
        for st in cfg.encoder:
            enc.append(HaloBlock(w, st, cfg, transposed=False))
            w = st.width
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = []
        for st in cfg.decoder:
            dec.append(HaloBlock(w, st, cfg, transposed=True))
            w = st.width
        self.decoder = nn.Sequential(*dec)
        self.upsample_mode = cfg.upsample
        if cfg.upsample == "depthwise":
            self.upsample: nn.Module | None = nn.ConvTranspose2d(c, c, cfg.head_kernel, groups=c, padding=0, bias=False)
        elif cfg.upsample == "bilinear":
            self.upsample = None
        else:
            raise BadInputError(f"model config {cfg.name!r}: unknown upsample {cfg.upsample!r} (depthwise | bilinear)")
        self.fm_size = cfg.fm_size

    def encode(self, fm: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.head(fm))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        y = self.decoder(z)
        if self.upsample is not None:
            return self.upsample(y)
        return F.interpolate(y, size=(self.fm_size, self.fm_size), mode="bilinear", align_corners=False)

    def forward(self, fm: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(fm))


class ImageReconstructor(nn.Module):
    """f̂m (N, C, 64, 64) → image (N, 3, 256, 256) in normalised space (training only).

    3×3 convs with reflection padding and ReLU between; the two ×2 nearest up-samplings come late (after the
    third conv) so the wide convs run at 64×64. No ReLU on the output: its target is negative in places.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        widths = [cfg.fm_channels, *cfg.image_widths, 3]
        n_up = 0
        scale = cfg.tile_size // cfg.fm_size
        while (1 << n_up) < scale:
            n_up += 1
        if (1 << n_up) != scale:
            raise BadInputError(f"model config {cfg.name!r}: tile_size / fm_size must be a power of two")
        layers: list[nn.Module] = []
        n_conv = len(widths) - 1
        up_after = set(range(max(0, n_conv - 2 - n_up), n_conv - 2)) if n_up else set()
        for i in range(n_conv):
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(widths[i], widths[i + 1], 3), nn.ReLU()]
            if i in up_after:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        while sum(isinstance(m, nn.Upsample) for m in layers) < n_up:  # very short width lists
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(3, 3, 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, fm_hat: torch.Tensor) -> torch.Tensor:
        return self.net(fm_hat)


class Classifier(nn.Module):
    """A linear layer on the reconstructed image → 2 logits (original / cut-pasted); training only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * cfg.tile_size * cfg.tile_size, 2)

    def forward(self, image_hat: torch.Tensor) -> torch.Tensor:
        return self.fc(image_hat.flatten(1))
