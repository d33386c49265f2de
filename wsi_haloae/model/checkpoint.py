"""Model files: one self-contained .safetensors file with JSON metadata in its header.

Holds the trainable weights, the BatchNorm running statistics, the frozen backbone weights that produced the
features (a few MB; compute nodes are offline and have no TORCH_HOME, so the file must not depend on a cache
or on ../shared), the training mean anomaly map, and in ``__metadata__``: the model config, the backbone
identity, the format marker and version, the package version and whatever the caller records (epochs, seed,
tiles, mpp ...). Never a pickle.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import MAX_MODEL_ELEMENTS, ModelConfig, check_mpp
from ..errors import BadModelFileError, OutputError, UserError
from ..fileio import atomic_output, os_reason, write_error
from ..scoring.calibration import check_block
from .features import file_sha256, tensors_sha256
from .haloae import HaloAE

FORMAT_NAME = "wsi-haloae-model"
FORMAT_VERSION = 1
_MODEL_PREFIX = "model."
_MEAN_MAP = "mean_map"
#: State keys a model file may lack: files written before stain normalisation existed load as identity.
_OPTIONAL_PREFIX = "stain."
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
    path = Path(path)
    cfg = model.config
    mm = torch.as_tensor(mean_map).detach().to("cpu", torch.float32).contiguous()
    if tuple(mm.shape) != (cfg.fm_size, cfg.fm_size):
        raise ValueError(f"save_model: mean map shape {tuple(mm.shape)} != ({cfg.fm_size}, {cfg.fm_size})")
    tensors = {_MODEL_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tensors[_MEAN_MAP] = mm
    check_mpp((metadata or {}).get("mpp"), "metadata mpp")  # never write a file load_model would refuse
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
    write_safetensors(path, tensors, header, "the model file")
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> None:
    """Write a safetensors file atomically; a failed write (full disk) is a one-line ``OutputError``.

    Why not ``safetensors.torch.save_file``: it reports a full disk as ``SafetensorError`` with the errno
    buried in its text. Serialising to bytes and writing them ourselves costs one copy of the file in memory
    (a model is tens of MB) and gives a plain OSError that ``atomic_output`` turns into ``PATH: cannot write
    WHAT (No space left on device)``, with the temp file removed and any earlier file under ``path`` untouched.
    """
    from safetensors.torch import save

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, what, exc) from None
    data = save(tensors, metadata=metadata)
    with atomic_output(path, what) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


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
    return _read_header(Path(path))["__metadata__"]


def is_model_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a wsi-haloae model file (by its header): what ``train --out`` may replace."""
    try:
        read_header(path)
    except BadModelFileError:
        return False
    return True


def _read_header(path: Path) -> dict[str, Any]:
    """The whole safetensors header (tensor dtypes, shapes, offsets and ``__metadata__``) of one of our files."""
    if not path.exists():
        raise BadModelFileError(f"model file {path}: not found")
    if not path.is_file():
        raise BadModelFileError(f"model file {path}: not a file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BadModelFileError(f"model file {path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n + 8 > size:
                raise BadModelFileError(f"model file {path}: not a safetensors file (is it a pickle/.pth or truncated?)")
            raw = f.read(n)
    except OSError as exc:
        raise BadModelFileError(f"model file {path}: cannot read ({os_reason(exc)})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadModelFileError(f"model file {path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise BadModelFileError(f"model file {path}: not a safetensors file (unreadable header)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise BadModelFileError(f"model file {path}: a safetensors file, but not a wsi-haloae model (no format marker)")
    try:
        version = int(meta.get("format_version", ""))
    except (TypeError, ValueError):
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
    header["__metadata__"] = meta
    return header


def _parse_metadata(meta: dict[str, str], path: Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(validated config, backbone info, caller's metadata with a checked ``mpp``) from the header's strings."""
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
        backbone_info = json.loads(meta.get("backbone_info", "{}"))
        user = json.loads(meta.get("metadata", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise BadModelFileError(f"model file {path}: bad metadata ({type(exc).__name__}: {exc})") from None
    except UserError as exc:  # "model config: head_width 200000 is outside 1..2048"
        raise BadModelFileError(f"model file {path}: {exc}") from None
    if not isinstance(backbone_info, dict) or not isinstance(user, dict):
        raise BadModelFileError(f"model file {path}: bad metadata (backbone_info and metadata must be JSON objects)")
    try:
        user["mpp"] = check_mpp(user.get("mpp"), "metadata mpp")
    except UserError as exc:
        raise BadModelFileError(f"model file {path}: {exc}") from None
    return cfg, backbone_info, user


#: safetensors dtype names of the torch dtypes a model holds.
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a model file of ``cfg`` holds: name -> (safetensors dtype, shape), mean map included.

    Built on the meta device: no memory is allocated, so a config that passed ``validate`` but is huge costs
    nothing here, and its size is refused against ``MAX_MODEL_ELEMENTS`` before the real model is built.
    """
    with torch.device("meta"):
        model = HaloAE(cfg)
    out = {_MODEL_PREFIX + k: (_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in model.state_dict().items()}
    out[_MEAN_MAP] = ("F32", (cfg.fm_size, cfg.fm_size))
    return out


def _check_tensors(header: dict[str, Any], cfg: ModelConfig, path: Path) -> None:
    """Names, dtypes and shapes in the header against what ``cfg`` builds, before anything is allocated."""
    expected = expected_tensors(cfg)
    elements = sum(math.prod(shape) for _, shape in expected.values())
    if elements > MAX_MODEL_ELEMENTS:
        raise BadModelFileError(f"model file {path}: config {cfg.name!r} makes a model of {elements:,} tensor elements, "
                                f"more than the {MAX_MODEL_ELEMENTS:,} a model file may hold (docs/model-card.md)")
    found = {k: v for k, v in header.items() if k != "__metadata__"}
    if _MEAN_MAP not in found:
        raise BadModelFileError(f"model file {path}: no mean map")
    missing = [k[len(_MODEL_PREFIX):] for k in expected if k not in found]
    optional = [k[len(_MODEL_PREFIX):] for k in expected if k.startswith(_MODEL_PREFIX + _OPTIONAL_PREFIX)]
    if optional and set(optional) <= set(missing):  # an older file: no stain tensors at all (loads as identity)
        missing = [k for k in missing if k not in optional]
        expected = {k: v for k, v in expected.items() if k in found}
    extra = sorted(k for k in found if k not in expected)
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
        raise BadModelFileError(
            f"model file {path}: tensors do not fit its config {cfg.name!r}: {what} ({len(missing)} missing, {len(extra)} unexpected)"
        )
    for key, (dtype, shape) in expected.items():
        info = found[key]
        try:
            got_dtype, got_shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise BadModelFileError(f"model file {path}: not a safetensors file (malformed entry for {key!r})") from None
        name = "mean map" if key == _MEAN_MAP else f"tensor {key[len(_MODEL_PREFIX):]!r}"
        if got_shape != shape:
            raise BadModelFileError(f"model file {path}: {name} has shape {list(got_shape)}, config {cfg.name!r} expects {list(shape)}")
        if got_dtype != dtype:
            raise BadModelFileError(f"model file {path}: {name} is {got_dtype}, config {cfg.name!r} expects {dtype}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Read and verify a model file; the model comes back in eval mode on ``device``.

    Everything a file claims is checked before memory is spent on it: the config against ``MODEL_BOUNDS``,
    the metadata mpp against ``MPP_RANGE``, each tensor's name, dtype and shape (from the header) against
    the config; only then is the model built and the tensors read.
    """
    from safetensors import safe_open

    path = Path(path)
    header = _read_header(path)
    meta = header["__metadata__"]
    cfg, backbone_info, user = _parse_metadata(meta, path)
    _check_tensors(header, cfg, path)
    try:
        model = HaloAE(cfg)
    except (ValueError, UserError) as exc:
        raise BadModelFileError(f"model file {path}: bad config ({exc})") from None
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            state = {}
            for k, ref in expected.items():
                if _MODEL_PREFIX + k not in keys:  # optional and absent (checked above): the fresh module's identity
                    state[k] = ref
                    continue
                state[k] = f.get_tensor(_MODEL_PREFIX + k)
            mean_map = f.get_tensor(_MEAN_MAP).float()
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadModelFileError(f"model file {path}: unreadable ({reason[:200]})") from None
    try:
        model.load_state_dict(state, strict=True)
    except ValueError as exc:  # e.g. an unknown stain method code
        raise BadModelFileError(f"model file {path}: bad stain normaliser state ({exc})") from None
    recorded = backbone_info.get("sha256")
    actual = tensors_sha256(model.features.layers.state_dict())
    if recorded and recorded != actual:
        raise BadModelFileError(f"model file {path}: backbone weights do not match their recorded sha256 (file altered?)")
    model.backbone_info = backbone_info
    user["calibration"] = check_block(user.get("calibration"), f"model file {path}", mean_map.numpy())
    user.setdefault("package_version", meta.get("package_version"))
    user.setdefault("format_version", int(meta["format_version"]))
    model.eval().to(device)
    return LoadedModel(model=model, mean_map=mean_map.to(device), metadata=user, sha256=file_sha256(path), path=path)


def rewrite_metadata(src: str | os.PathLike, dst: str | os.PathLike, updates: dict[str, Any], what: str = "model file") -> Path:
    """Copy model file ``src`` to ``dst`` with ``updates`` merged into its metadata; tensors and every other
    header entry unchanged. Atomic (``dst`` may be ``src``: it is replaced whole or not at all)."""
    from safetensors import safe_open

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
    write_safetensors(dst, tensors, header, what)
    return dst
