"""One place that turns ``--device`` into a torch device, so every command accepts the same values."""

from __future__ import annotations

import torch

from ..errors import BadInputError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a missing GPU is a user error."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {name}: no CUDA device is available here (use --device cpu or auto)")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise BadInputError(f"--device {name}: expected cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise BadInputError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
