"""The whole HaloAE model: frozen VGG19 taps → HaloNet auto-encoder, plus the training-only heads.

Input is RGB in [0, 1]; the model applies its stain normalisation (``stain.py``, fitted on the training tiles,
identity when there is none) and then the ImageNet mean/std itself, so that both run on the device, next to
the data, and every command that runs the model applies the same transform. ``anomaly_map`` is the inference path: it never touches the image
reconstructor or the classifier.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from ..config import ModelConfig
from .autoencoder import Classifier, HaloAutoEncoder, ImageReconstructor
from .features import VGGFeatures
from .stain import StainNormalizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HaloAEOutput(NamedTuple):
    fm: torch.Tensor
    fm_hat: torch.Tensor
    image_hat: torch.Tensor | None  # normalised space; None in eval mode
    logits: torch.Tensor | None  # (N, 2); None in eval mode


class HaloAE(nn.Module):
    """HaloAE (Mathian et al., VISAPP 2023) with real halo attention; see docs/model-card.md."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.features = VGGFeatures(config.taps, config.fm_size)
        self.autoencoder = HaloAutoEncoder(config)
        self.image_decoder = ImageReconstructor(config)
        self.classifier = Classifier(config)
        self.stain = StainNormalizer()  # non-trainable; its reference travels in the model file (stain.*)
        self.register_buffer("img_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("img_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone_info: dict = {"source": None, "sha256": None, "path": None, "file_sha256": None, "seed": None}

    # -- pieces -------------------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] → ImageNet-normalised (the backbone's and the image reconstructor's space)."""
        return (x - self.img_mean.to(x.dtype)) / self.img_std.to(x.dtype)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] → what the backbone sees: stain-normalised, then ImageNet-normalised (no gradient).

        Also the image reconstructor's target in training, so that it reconstructs what the features saw.
        """
        with torch.no_grad():
            return self.normalize(self.stain(x))

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen multi-scale feature map fm (N, C, 64, 64) of RGB [0, 1] input; no gradient."""
        with torch.no_grad():
            return self.features(self.preprocess(x))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fm = self.extract(x)
        return fm, self.autoencoder(fm)

    # -- public API ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> HaloAEOutput:
        fm, fm_hat = self.reconstruct(x)
        if not self.training:
            return HaloAEOutput(fm, fm_hat, None, None)
        image_hat = self.image_decoder(fm_hat)
        return HaloAEOutput(fm, fm_hat, image_hat, self.classifier(image_hat))

    @torch.no_grad()
    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 256, 256) RGB [0, 1] → (N, 64, 64) float32 mean over channels of (fm − f̂m)².

        Uses BatchNorm in whatever mode the model is in: call ``model.eval()`` first (inference does).
        """
        fm, fm_hat = self.reconstruct(x)
        return (fm.float() - fm_hat.float()).pow(2).mean(dim=1)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_breakdown(self) -> dict[str, int]:
        """Trainable parameters per part (the frozen backbone counted separately)."""
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        return {
            "autoencoder": count(self.autoencoder),
            "image_reconstructor": count(self.image_decoder),
            "classifier": count(self.classifier),
            "total_trainable": self.trainable_parameters(),
            "frozen_backbone": sum(p.numel() for p in self.features.parameters()),
        }


def _seeded_init(model: HaloAE, seed: int) -> None:
    """Re-initialise every trainable module from a private generator: same seed, same model, any RNG state."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if m is model.features or any(p is not None and not p.requires_grad for p in m.parameters(recurse=False)):
            continue
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=5**0.5, generator=g)  # PyTorch's default, but seeded
            if m.bias is not None:
                fan_in = nn.init._calculate_fan_in_and_fan_out(m.weight)[0]
                bound = 1 / fan_in**0.5 if fan_in > 0 else 0
                nn.init.uniform_(m.bias, -bound, bound, generator=g)
    from .halo import HaloAttention

    for m in model.modules():
        if isinstance(m, HaloAttention):
            nn.init.normal_(m.rel_height, std=m.scale, generator=g)
            nn.init.normal_(m.rel_width, std=m.scale, generator=g)


def build_model(preset: str | ModelConfig = "paper", backbone_weights: str | os.PathLike = "imagenet", seed: int = 0) -> HaloAE:
    """A HaloAE of the given preset (name, JSON path or ModelConfig) with its frozen backbone loaded.

    ``backbone_weights``: ``"imagenet"`` (TORCH_HOME cache or download), ``"random"`` (seeded), or a path to a
    torchvision-layout VGG19 state dict covering the deepest tap. Trainable weights are initialised from
    ``seed`` so that two builds with the same arguments are identical.
    """
    cfg = preset if isinstance(preset, ModelConfig) else ModelConfig.preset(str(preset))
    model = HaloAE(cfg)
    _seeded_init(model, seed)
    model.backbone_info = model.features.load_backbone(backbone_weights)
    return model
