"""What the model takes: RGB uint8 images (H, W, 3) become float (N, 3, H, W) in [0, 1].

One place for the conversion, shared by training, evaluation and tests (inference sends uint8 to the device
and converts there, the same arithmetic).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


def stack_tiles(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images of one size → float (N, 3, H, W) in [0, 1]."""
    return torch.stack([to_tensor(a) for a in arrays])
