"""Model files: one self-contained .safetensors file with JSON metadata in its header.

Holds the trainable weights, the BatchNorm running statistics, the frozen backbone weights that produced the
features (a few MB; compute nodes are offline and have no TORCH_HOME, so the file must not depend on a cache
or on ../shared), the training mean anomaly map, and in ``__metadata__``: the model config, the backbone
identity, the format marker and version, the package version and whatever the caller records (epochs, seed,
tiles, mpp ...). Never a pickle.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import ModelConfig
from ..errors import BadModelFileError, OutputError, UserError
from ..fileio import atomic_output
from ..scoring.calibration import check_block
from .features import file_sha256, tensors_sha256
from .haloae import HaloAE

FORMAT_NAME = "wsi-haloae-model"
FORMAT_VERSION = 1
_MODEL_PREFIX = "model."
_MEAN_MAP = "mean_map"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class LoadedModel:
    model: HaloAE
    mean_map: torch.Tensor  # (fm_size, fm_size) float32, on the model's device
    metadata: dict[str, Any]  # the caller's metadata; "mpp" always present (None when unknown)
    sha256: str  # of the model file: identifies it in every output's provenance
    path: Path | None = None


def save_model(path: str | os.PathLike, model: HaloAE, mean_map: torch.Tensor, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` + ``mean_map`` + ``metadata`` (JSON-able) atomically: a temp file, then a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    cfg = model.config
    mm = torch.as_tensor(mean_map).detach().to("cpu", torch.float32).contiguous()
    if tuple(mm.shape) != (cfg.fm_size, cfg.fm_size):
        raise ValueError(f"save_model: mean map shape {tuple(mm.shape)} != ({cfg.fm_size}, {cfg.fm_size})")
    tensors = {_MODEL_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tensors[_MEAN_MAP] = mm
    try:
        user = json.dumps(dict(metadata or {}), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save_model: metadata is not JSON-serialisable ({exc})") from None
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "package_version": __version__,
        "config": json.dumps(cfg.to_dict()),
        "backbone_info": json.dumps(model.backbone_info),
        "metadata": user,
    }
    if path.is_dir():
        raise OutputError(f"model file {path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
    except OSError as exc:
        raise OutputError(f"model file {path}: cannot write ({exc.strerror or exc})") from None
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a model file, checked to be ours (cheap: reads the header only)."""
    path = Path(path)
    if not path.exists():
        raise BadModelFileError(f"model file {path}: not found")
    if not path.is_file():
        raise BadModelFileError(f"model file {path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadModelFileError(f"model file {path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise BadModelFileError(f"model file {path}: not a safetensors file (is it a pickle/.pth or truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadModelFileError(f"model file {path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise BadModelFileError(f"model file {path}: not a safetensors file (unreadable header)")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise BadModelFileError(f"model file {path}: a safetensors file, but not a wsi-haloae model (no format marker)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise BadModelFileError(f"model file {path}: bad format version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise BadModelFileError(
            f"model file {path}: format version {version} is newer than this wsi-haloae ({__version__}) reads ({FORMAT_VERSION}); upgrade"
        )
    # every tensor must lie inside the file: catches truncation before any tensor is read
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise BadModelFileError(f"model file {path}: not a safetensors file (malformed header)") from None
    if 8 + n + end > size:
        raise BadModelFileError(f"model file {path}: truncated ({size} bytes, the header promises {8 + n + end})")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Read and verify a model file; the model comes back in eval mode on ``device``."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_header(path)
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
        backbone_info = json.loads(meta.get("backbone_info", "{}"))
        user = json.loads(meta.get("metadata", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise BadModelFileError(f"model file {path}: bad metadata ({type(exc).__name__}: {exc})") from None
    except UserError as exc:
        raise BadModelFileError(f"model file {path}: bad config ({exc})") from None
    try:
        model = HaloAE(cfg)
    except (ValueError, UserError) as exc:
        raise BadModelFileError(f"model file {path}: bad config ({exc})") from None
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if _MEAN_MAP not in keys:
                raise BadModelFileError(f"model file {path}: no mean map")
            missing = [k for k in expected if _MODEL_PREFIX + k not in keys]
            extra = sorted(k for k in keys if k != _MEAN_MAP and k[len(_MODEL_PREFIX):] not in expected)
            if missing or extra:
                what = f"lacks tensor {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
                raise BadModelFileError(
                    f"model file {path}: tensors do not fit its config {cfg.name!r}: {what} ({len(missing)} missing, {len(extra)} unexpected)"
                )
            state = {}
            for k, ref in expected.items():
                t = f.get_tensor(_MODEL_PREFIX + k)
                if tuple(t.shape) != tuple(ref.shape):
                    raise BadModelFileError(
                        f"model file {path}: tensor {k!r} has shape {list(t.shape)}, config {cfg.name!r} expects {list(ref.shape)}"
                    )
                state[k] = t
            mean_map = f.get_tensor(_MEAN_MAP).float()
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"model file {path}: unreadable ({reason[:200]})") from None
    if tuple(mean_map.shape) != (cfg.fm_size, cfg.fm_size):
        raise BadModelFileError(f"model file {path}: mean map shape {list(mean_map.shape)} != [{cfg.fm_size}, {cfg.fm_size}]")
    model.load_state_dict(state, strict=True)
    recorded = backbone_info.get("sha256")
    actual = tensors_sha256(model.features.layers.state_dict())
    if recorded and recorded != actual:
        raise BadModelFileError(f"model file {path}: backbone weights do not match their recorded sha256 (file altered?)")
    model.backbone_info = backbone_info
    user = dict(user) if isinstance(user, dict) else {}
    user.setdefault("mpp", None)
    user["calibration"] = check_block(user.get("calibration"), f"model file {path}", mean_map.numpy())
    user.setdefault("package_version", meta.get("package_version"))
    user.setdefault("format_version", int(meta["format_version"]))
    model.eval().to(device)
    return LoadedModel(model=model, mean_map=mean_map.to(device), metadata=user, sha256=file_sha256(path), path=path)


def rewrite_metadata(src: str | os.PathLike, dst: str | os.PathLike, updates: dict[str, Any], what: str = "model file") -> Path:
    """Copy model file ``src`` to ``dst`` with ``updates`` merged into its metadata; tensors and every other
    header entry unchanged. Atomic (``dst`` may be ``src``: it is replaced whole or not at all)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    header = dict(read_header(src))
    try:
        user = json.loads(header.get("metadata", "{}"))
        with safe_open(str(src), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (json.JSONDecodeError, OSError) as exc:
        raise BadModelFileError(f"model file {src}: unreadable ({exc})") from None
    user = dict(user) if isinstance(user, dict) else {}
    user.update(updates)
    try:
        header["metadata"] = json.dumps(user, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rewrite_metadata: metadata is not JSON-serialisable ({exc})") from None
    with atomic_output(dst, what) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return dst
