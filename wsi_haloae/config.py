"""Configuration dataclasses shared by the commands.

Model presets are data files in ``models/`` (installed as ``wsi_haloae.presets``); everything a command
needs travels in one of these dataclasses so that the CLI stays a thin parser.
"""

from __future__ import annotations

import json
import math
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


#: Microns per pixel a model may record for its training tiles: 0.05 (finer than any slide scanner's optics:
#: 40x is 0.25, the diffraction limit of visible light ~0.2) to 100 (a 400x downsample of a 40x scan, past
#: the point where tissue structure survives). A value outside is a corrupt or hand-edited file, not a scan;
#: trusting it would read a slide at 0.001 µm/px (millions of up-sampled tiles) or at a few pixels a slide.
MPP_RANGE: tuple[float, float] = (0.05, 100.0)


def check_mpp(value: Any, what: str) -> float | None:
    """``value`` as microns per pixel (None stays None); BadInputError naming ``what`` outside ``MPP_RANGE``."""
    if value is None:
        return None
    lo, hi = MPP_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{what} {value!r} is not a number")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise BadInputError(f"{what} {value!r} is outside the plausible range {lo:g}-{hi:g} µm/px")
    return float(value)


# ------------------------------------------------------------------------------------ model config bounds
#: Allowed values of ``ModelConfig.attention``.
ATTENTION_MODES = ("halo", "authors-mask")


@dataclass(frozen=True)
class Int:
    """A whole number in [lo, hi] (``odd``: odd only, e.g. a same-padding kernel)."""

    lo: int
    hi: int
    odd: bool = False

    def problem(self, v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"{v!r} is not a whole number"
        if not self.lo <= v <= self.hi:
            return f"{v} is outside {self.lo}..{self.hi}"
        if self.odd and v % 2 == 0:
            return f"{v} is even (must be odd)"
        return None


@dataclass(frozen=True)
class Count:
    """A list whose length is in [lo, hi] (its items have their own ``name[]`` entry)."""

    lo: int
    hi: int

    def problem(self, v: Any) -> str | None:
        if not isinstance(v, (list, tuple)):
            return f"{v!r} is not a list"
        if not self.lo <= len(v) <= self.hi:
            return f"has {len(v)} entries, not {self.lo}..{self.hi}"
        return None


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def problem(self, v: Any) -> str | None:
        return None if v in self.choices else f"{v!r} is not one of {', '.join(self.choices)}"


@dataclass(frozen=True)
class Text:
    max_len: int

    def problem(self, v: Any) -> str | None:
        if not isinstance(v, str):
            return f"{v!r} is not a string"
        return None if len(v) <= self.max_len else f"is longer than {self.max_len} characters"


#: Bounds of every ModelConfig field, checked before any module is built: a model file's metadata is
#: untrusted, and a width of 10^9 must cost a one-line error, not 19 TB of allocation. ``name[].field``
#: applies to each item of a list. The upper bounds sit well above every preset (paper: widths <= 704, heads
#: <= 8, kernels <= 5, block 12, halo 2, dim_head 16) and below sizes whose single layer would take GBs;
#: ``MAX_MODEL_ELEMENTS`` caps the whole model. A new ModelConfig field needs its line here (a test checks).
MODEL_BOUNDS: dict[str, Int | Count | OneOf | Text] = {
    "name": Text(200),
    "description": Text(2000),
    "taps": Count(1, len(VGG19_TAPS)),
    "taps[]": OneOf(tuple(VGG19_TAPS)),
    "head_width": Int(1, 2048),
    "head_kernel": Int(1, 15),
    "encoder": Count(1, 8),
    "encoder[].width": Int(1, 2048),
    "encoder[].kernel": Int(1, 9, odd=True),
    "encoder[].heads": Int(1, 32),
    "decoder": Count(1, 8),
    "decoder[].width": Int(1, 2048),
    "decoder[].kernel": Int(1, 9, odd=True),
    "decoder[].heads": Int(1, 32),
    "block": Int(1, 64),
    "halo": Int(0, 32),
    "dim_head": Int(1, 256),
    "image_widths": Count(1, 8),
    "image_widths[]": Int(1, 2048),
    "tile_size": Int(32, 1024),
    "fm_size": Int(8, 256),
    "upsample": OneOf(("depthwise", "bilinear")),
    "attention": OneOf(ATTENTION_MODES),
}

#: Tensor elements a model file may hold (weights + buffers): 100M (400 MB in float32), 7x the paper model
#: (14M with its frozen backbone). Checked on the meta device from the config, before anything is allocated.
MAX_MODEL_ELEMENTS = 100_000_000


def _values(obj: Any, path: str) -> list[tuple[str, Any]]:
    """(label, value) of a ``MODEL_BOUNDS`` path: ``encoder[].width`` -> encoder[0].width, encoder[1].width ..."""
    found: list[tuple[str, Any]] = [("", obj)]
    for part in path.split("."):
        nxt: list[tuple[str, Any]] = []
        each = part.endswith("[]")
        key = part[:-2] if each else part
        for label, o in found:
            v = o.get(key) if isinstance(o, dict) else getattr(o, key, None)
            label = f"{label}.{key}" if label else key
            if each:
                nxt += [(f"{label}[{i}]", item) for i, item in enumerate(v)] if isinstance(v, (list, tuple)) else []
            else:
                nxt.append((label, v))
        found = nxt
    return found


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
    #: "halo": real halo attention (HaloNet, the paper's text); "authors-mask": what the authors' code computes
    #: with its inverted mask (windowed average pooling of v; see docs/model-card.md), to reproduce their numbers
    attention: str = "halo"
    description: str = ""

    @property
    def fm_channels(self) -> int:
        return sum(VGG19_TAPS[t][1] for t in self.taps)

    @property
    def deepest_layer(self) -> int:
        """Index of the last VGG19 ``features`` layer that must run."""
        return max(VGG19_TAPS[t][0] for t in self.taps)

    def validate(self) -> "ModelConfig":
        """Check every field against ``MODEL_BOUNDS`` and the shape rules between fields; BadInputError if not.

        Pure Python, no module built: the only door a model file's config passes before anything is allocated.
        """
        for path, bound in MODEL_BOUNDS.items():
            for label, value in _values(self, path):
                why = bound.problem(value)
                if why:
                    raise BadInputError(f"model config: {label} {why}")
        inner = self.fm_size - self.head_kernel + 1
        rules = [
            (len(set(self.taps)) == len(self.taps), f"taps {', '.join(self.taps)} repeat a layer"),
            (self.decoder[-1].width == self.fm_channels,
             f"last decoder width {self.decoder[-1].width} != fm channels {self.fm_channels} of taps {', '.join(self.taps)}"),
            (inner > 0 and inner % self.block == 0,
             f"head output {inner}x{inner} (fm_size {self.fm_size} - head_kernel {self.head_kernel} + 1) is not a "
             f"positive multiple of block {self.block}"),
            (self.tile_size % self.fm_size == 0 and (self.tile_size // self.fm_size).bit_count() == 1,
             f"tile_size {self.tile_size} / fm_size {self.fm_size} is not a power of two"),
        ]
        for ok, why in rules:
            if not ok:
                raise BadInputError(f"model config {self.name!r}: {why}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["taps"] = list(self.taps)
        d["image_widths"] = list(self.image_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A validated config from JSON (a preset or a model file): BadInputError for anything off."""
        if not isinstance(d, dict):
            raise BadInputError(f"model config: not a JSON object ({type(d).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BadInputError(f"model config: unknown keys {sorted(unknown)}")
        try:
            d = dict(d)
            for key in ("taps", "encoder", "decoder", "image_widths"):
                if key in d and not isinstance(d[key], list):
                    raise BadInputError(f"model config: {key} {d[key]!r} is not a list")
            d["taps"] = tuple(d["taps"])
            d["encoder"] = tuple(StageConfig(**s) for s in d["encoder"])
            d["decoder"] = tuple(StageConfig(**s) for s in d["decoder"])
            if "image_widths" in d:
                d["image_widths"] = tuple(d["image_widths"])
            cfg = cls(**d)
        except (KeyError, TypeError) as exc:
            raise BadInputError(f"model config: malformed ({exc})") from None
        return cfg.validate()

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        return cls.from_dict(load_preset(name))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("wsi_haloae.presets").iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """Read models/<name>.json, or a path to a JSON file of the same layout."""
    path = Path(name)
    if name.endswith(".json") and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"preset {path}: not readable JSON ({exc})") from None
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
    stain_normalize: str = "auto"  # auto (macenko for histology tiles, none for an MVTec-AD folder) | none | macenko | reinhard
    stain_augment: float = 0.05  # HED jitter strength (train/stain_augment.py); 0 = off
    max_steps: int | None = None  # testing aid: stop after this many optimizer steps (in total)
    val_fraction: float = 0.1  # normal tiles (whole slides when possible) kept out to calibrate the model
    max_seconds: float | None = None  # benchmark aid: stop training after this long, then finish the model as usual
    checkpoint_minutes: float = 10.0  # a resume file this often (and at every epoch end); 0: after every step
    refresh_bn: bool = True  # recompute BatchNorm statistics on the training tiles after the last step (train/batchnorm.py)
    compile: bool = False  # torch.compile the model for the training steps (meant for CUDA; minutes to compile)


#: The overlaps ``--overlap`` accepts: 1 - 1/k, so that a window falls exactly on every grid tile
#: (``slide.grid.windows_per_tile`` also checks that k divides the model's tile size).
OVERLAPS = (0.0, 0.5, 0.75, 0.875)


def _check_overlap(overlap: float) -> None:
    if not any(abs(overlap - o) < 1e-9 for o in OVERLAPS):
        raise BadInputError(f"--overlap {overlap:g}: use one of {', '.join(f'{o:g}' for o in OVERLAPS)} (1 - 1/k, so "
                            f"that windows fall exactly on every tile)")


#: ``--threshold``: how tiles are classified Anomalous (``scoring.rules.RULES``; not imported: config stays leaf).
THRESHOLD_RULES = ("fdr", "mad")


@dataclass(frozen=True)
class InferOptions:
    """How a slide is scored: one object shared by ``infer``, ``cohort`` and the cohort worker's task.

    Passed whole, never copied field by field: a new option is one field here plus one CLI declaration
    (``cli._infer_options``), and it reaches every slide of a cohort without further code.
    """

    mpp: float | None = None  # target µm/px (None: --magnification, else the model's training mpp, else level 0)
    magnification: str | None = None  # the target as an objective power ("20x" = 0.5 µm/px; slide.resolution)
    slide_mpp: float | None = None  # the scan's level-0 µm/px, for slides that do not record it (overrides the file)
    overlap: float = 0.0  # fraction of a tile by which scoring windows overlap (1 - 1/k: 0, 0.5, 0.75, 0.875)
    batch_size: int = 32  # tiles per model call (reduced, with a warning, to what fits in memory)
    workers: int = 2  # tile-reading processes
    device: str = "auto"
    pixel_downsample: int = 4  # slide pixels (at the target mpp) per heatmap pixel at level 0 of the map
    min_tissue: float = 0.1  # tissue fraction a tile needs to be scored (edge tiles included: any real tissue)
    max_failed_fraction: float = 0.05  # unreadable tissue tiles tolerated before the slide is refused
    progress: bool = True  # a tqdm bar on stderr
    ngff: str = "0.4"  # OME-NGFF version of the store: 0.4 on Zarr 2 (what QuPath 0.6 reads) or 0.5 on Zarr 3
    # calibrated calls (issue 10, scoring/): the rule that classifies tiles Anomalous, and its FDR level
    fdr: float = 0.05  # Benjamini-Hochberg level over a slide's tissue tiles (rule "fdr")
    threshold: str = "fdr"  # "fdr": calibrated p-values + BH (needs a calibrated model); "mad": per-slide median + 3 MAD

    def __post_init__(self) -> None:
        if self.mpp is not None and not self.mpp > 0:
            raise BadInputError(f"--mpp {self.mpp}: must be positive")
        if self.mpp is not None and self.magnification is not None:
            raise BadInputError("give the target resolution as --mpp or as --magnification, not both")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise BadInputError(f"--slide-mpp {self.slide_mpp}: must be positive")
        _check_overlap(self.overlap)
        if self.batch_size < 1:
            raise BadInputError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.workers < 0:
            raise BadInputError(f"--workers {self.workers}: must be 0 or more")
        if self.pixel_downsample < 1:
            raise BadInputError(f"--pixel-downsample {self.pixel_downsample}: must be at least 1")
        if not 0 <= self.min_tissue <= 1:
            raise BadInputError(f"--min-tissue {self.min_tissue}: must be between 0 and 1")
        if self.ngff not in ("0.4", "0.5"):
            raise BadInputError(f"--ngff {self.ngff}: expected 0.4 (Zarr 2) or 0.5 (Zarr 3)")
        if not 0 <= self.max_failed_fraction <= 1:
            raise BadInputError(f"max_failed_fraction {self.max_failed_fraction}: must be between 0 and 1")
        if not 0 < self.fdr < 1:
            raise BadInputError(f"--fdr {self.fdr:g}: must be between 0 and 1 (exclusive), e.g. 0.05")
        if self.threshold not in THRESHOLD_RULES:
            raise BadInputError(f"--threshold {self.threshold}: expected one of {', '.join(THRESHOLD_RULES)}")


@dataclass
class InferConfig:
    """One slide: its model, the store ``out`` and the extra outputs by name (``infer.outputs``: tiff,
    geojson, preview -> path), how to score it, and whether to redo a complete result. ``slide_id``: the
    slide's name in titles (the cohort's id; None: from the file name, ``slide.ids.slide_id``)."""

    slide: Path
    model: Path
    out: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    options: InferOptions = InferOptions()
    overwrite: bool = False
    slide_id: str | None = None


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
    magnification: str | None = None  # e.g. "20x": another way to give the target mpp (slide.resolution)
    slide_mpp: float | None = None  # the scan's level-0 µm/px, for slides that do not record it
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
    options: InferOptions = InferOptions()  # how every slide is scored (a manifest mpp overrides options.mpp)
    outputs: tuple[str, ...] | None = None  # extra outputs by name (infer.outputs); None: the registry's defaults
    overwrite: bool = False
