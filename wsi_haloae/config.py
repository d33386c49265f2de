"""Configuration dataclasses shared by the commands.

Model presets are data files in ``models/`` (installed as ``wsi_haloae.presets``); everything a command
needs travels in one of these dataclasses so that the CLI stays a thin parser.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import BadInputError

#: VGG19 ReLU layers we can tap, with their index in ``torchvision.models.vgg19().features`` and width.
VGG19_TAPS: dict[str, tuple[int, int]] = {
    "relu1_1": (1, 64),
    "relu1_2": (3, 64),
    "relu2_1": (6, 128),
    "relu2_2": (8, 128),
    "relu3_1": (11, 256),
    "relu3_2": (13, 256),
    "relu3_3": (15, 256),
    "relu3_4": (17, 256),
}


@dataclass(frozen=True)
class StageConfig:
    """One HaloNet block: output width, kernel size of its k×k conv, attention heads."""

    width: int
    kernel: int
    heads: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a HaloAE model. Presets live in models/<name>.json."""

    name: str
    taps: tuple[str, ...]
    head_width: int
    head_kernel: int
    encoder: tuple[StageConfig, ...]
    decoder: tuple[StageConfig, ...]
    block: int = 12
    halo: int = 2
    dim_head: int = 16
    image_widths: tuple[int, ...] = (380, 190, 95, 47, 23)
    tile_size: int = 256
    fm_size: int = 64
    upsample: str = "depthwise"  # how the decoder goes 60 -> 64: "depthwise" (5x5 transposed) or "bilinear"
    description: str = ""

    @property
    def fm_channels(self) -> int:
        return sum(VGG19_TAPS[t][1] for t in self.taps)

    @property
    def deepest_layer(self) -> int:
        """Index of the last VGG19 ``features`` layer that must run."""
        return max(VGG19_TAPS[t][0] for t in self.taps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["taps"] = list(self.taps)
        d["image_widths"] = list(self.image_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BadInputError(f"model config: unknown keys {sorted(unknown)}")
        try:
            d = dict(d)
            d["taps"] = tuple(d["taps"])
            for t in d["taps"]:
                if t not in VGG19_TAPS:
                    raise BadInputError(f"model config: unknown VGG19 tap {t!r} (known: {sorted(VGG19_TAPS)})")
            d["encoder"] = tuple(StageConfig(**s) for s in d["encoder"])
            d["decoder"] = tuple(StageConfig(**s) for s in d["decoder"])
            if "image_widths" in d:
                d["image_widths"] = tuple(d["image_widths"])
            return cls(**d)
        except (KeyError, TypeError) as exc:
            raise BadInputError(f"model config: malformed ({exc})") from None

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        return cls.from_dict(load_preset(name))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("wsi_haloae.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """Read models/<name>.json, or a path to a JSON file of the same layout."""
    path = Path(name)
    if name.endswith(".json") and path.is_file():
        return json.loads(path.read_text())
    res = resources.files("wsi_haloae.presets") / f"{name}.json"
    if not res.is_file():
        raise BadInputError(f"unknown preset {name!r} (known: {', '.join(preset_names())})")
    return json.loads(res.read_text())


@dataclass
class TrainConfig:
    tiles: Path
    out: Path
    preset: str = "paper"
    epochs: int = 250
    samples_per_epoch: int = 3000
    batch_size: int = 4  # originals per step; the step sees 3x this many images (Cut&Paste normal + scar)
    backbone_weights: str = "imagenet"
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    resume: bool = False
    lr: float = 1e-4
    weight_decay: float = 1e-5
    jitter: float = 0.1
    max_steps: int | None = None  # testing aid: stop after this many optimizer steps (in total)
    val_fraction: float = 0.1  # normal tiles (whole slides when possible) kept out to calibrate the model


@dataclass
class InferConfig:
    slide: Path
    model: Path
    out: Path
    tiff: Path | None = None
    geojson: Path | None = None
    preview: Path | None = None
    mpp: float | None = None
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    pixel_downsample: int = 4
    min_tissue: float = 0.5
    overwrite: bool = False
    max_failed_fraction: float = 0.05
    progress: bool = True


@dataclass
class CalibrateConfig:
    model: Path
    tiles: Path
    out: Path
    device: str = "auto"
    batch_size: int = 32
    workers: int = 2
    progress: bool = True


@dataclass
class TilesConfig:
    slide: Path
    out: Path
    mpp: float | None = None
    tile_size: int = 256
    stride: int | None = None
    min_tissue: float = 0.5
    annotations: Path | None = None
    class_name: str | None = None
    max_tiles: int | None = None
    format: str = "png"
    workers: int = 1
    seed: int = 0


@dataclass
class CohortConfig:
    slides: str
    model: Path
    out: Path
    cluster: str = "local"
    jobs: int | None = None  # None: local = one worker per GPU (else per infer_workers+1 cores); batch = 1 job
    workers_per_job: int = 1
    gpus_per_job: int = 0
    cores: int | None = None
    memory: str | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    job_extra: tuple[str, ...] = ()
    scheduler_address: str | None = None
    dry_run: bool = False
    retries: int = 2
    # options passed through to infer for every slide
    mpp: float | None = None
    batch_size: int = 32
    infer_workers: int = 2
    device: str = "auto"
    pixel_downsample: int = 4
    min_tissue: float = 0.5
    tiff: bool = True
    geojson: bool = True
    preview: bool = True
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
