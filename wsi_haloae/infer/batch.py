"""How many tiles go to the model at once: ``--batch-size``, reduced (with a warning) to what fits in memory.

Why measured, not guessed: a tile's working memory depends on the preset (tiny ~34 MB, r31 ~72 MB per tile on
CPU in float32) and the device, and a batch of 100000 once asked for gigabytes before failing. So one tile is
scored first, and what its scoring allocates is measured: on CUDA with the caching allocator's peak
(workspaces included); on CPU by following every tensor the operators create until it is freed (a
``TorchDispatchMode``, on the meta device: shapes without arithmetic; it matched the process's peak RSS
within 10 % for the tiny and r31 presets: 34 and 72 MB per tile). The batch
then gets at most ``DEVICE_SHARE`` of the free GPU memory, or ``HOST_SHARE`` of the memory the machine (or the
job's cgroup, as under SLURM) has available, the rest being left to the tile readers, slide caches and other
processes. The host also holds the tiles in flight between the readers and the model, and the maps queued
for the writer: those are counted per tile too.
"""

from __future__ import annotations

import copy
import functools
import logging
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

HOST_SHARE = 0.5
DEVICE_SHARE = 0.8
PREFETCH = 4  # batches each tile reader prepares ahead (dataset.make_loader)


class _PeakTensorBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors the operators create, from entry to exit.

    Storages that exist before (weights, the input) are known and never counted; a storage is counted once,
    when an operator first returns it, and uncounted when it is freed (a weak reference's callback).
    """

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref | None] = {t.untyped_storage()._cdata: None for t in known}

    def _free(self, key: int, n: int, _ref) -> None:
        self.live -= n
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._refs:
                    n = st.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self._refs[key] = weakref.ref(st, functools.partial(self._free, key, n))
        return out


def bytes_per_tile(make_score: Callable[[torch.nn.Module, torch.Tensor], Callable], model: torch.nn.Module,
                   mean_map: torch.Tensor, device: torch.device) -> int:
    """Memory that scoring one tile allocates on ``device``.

    ``make_score(model, mean_map)`` builds the per-batch scoring (it takes uint8 (B, 3, T, T)). On CUDA one
    real tile is scored and the allocator's peak read (milliseconds). On the CPU the same computation runs
    on a copy of the model on the ``meta`` device: shapes only, no arithmetic and no warm-up of CPU kernels
    for a batch shape used once, and the same byte count as a real CPU run (checked for tiny, r31, paper).
    """
    t = model.config.tile_size
    with torch.inference_mode():
        if device.type == "cuda":
            x = torch.zeros((1, 3, t, t), dtype=torch.uint8, device=device)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            make_score(model, mean_map)(x)
            torch.cuda.synchronize(device)
            return max(1, torch.cuda.max_memory_allocated(device) - base)
        try:
            return _tracked(make_score, copy.deepcopy(model).to("meta"), mean_map.to("meta"), t)
        except (NotImplementedError, RuntimeError) as exc:  # a module without meta kernels: one real tile
            log.debug("meta-device memory probe failed (%s); scoring one real tile instead", exc)
            return _tracked(make_score, model, mean_map, t)


def _tracked(make_score, model: torch.nn.Module, mean_map: torch.Tensor, t: int) -> int:
    x = torch.zeros((1, 3, t, t), dtype=torch.uint8, device=mean_map.device)
    with _PeakTensorBytes([*model.parameters(), *model.buffers(), mean_map, x]) as tracker:
        make_score(model, mean_map)(x)
    return max(1, tracker.peak)


def host_bytes_per_tile(tile_size: int, block: int, workers: int, queued_batches: int) -> int:
    """Host memory a tile costs outside the model: uint8 tiles in flight (each reader prepares ``PREFETCH``
    batches, plus the batch being moved), and float32 map blocks queued for the writer."""
    in_flight = workers * PREFETCH + 2
    return 3 * tile_size * tile_size * in_flight + 4 * block * block * (queued_batches + 1)


def available_host_bytes() -> int | None:
    """What this process may still use: the machine's MemAvailable, or less under a cgroup limit (SLURM,
    containers). None where neither can be read (then the batch is not reduced)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            if lim != "max" and int(lim) < 2**60:
                found.append(max(0, int(lim) - int(Path(usage).read_text().strip())))
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def available_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def fit_batch_size(requested: int, n_tiles: int, device: torch.device, per_tile_model: int, per_tile_host: int,
                   host_free: int | None, device_free: int | None) -> int:
    """The batch size to use: ``requested``, at most the slide's tile count, and reduced with a warning when
    a batch would not fit in the memory shares (module docstring)."""
    batch = max(1, min(requested, n_tiles))
    limits: list[tuple[int, str]] = []
    if device.type == "cuda":
        if device_free is not None:
            limits.append((int(DEVICE_SHARE * device_free // per_tile_model),
                           f"{_gb(per_tile_model)} of {device} memory per tile; {_gb(device_free)} free"))
        if host_free is not None:
            limits.append((int(HOST_SHARE * host_free // per_tile_host),
                           f"{_gb(per_tile_host)} of host memory per tile; {_gb(host_free)} available"))
    elif host_free is not None:
        per = per_tile_model + per_tile_host
        limits.append((int(HOST_SHARE * host_free // per), f"{_gb(per)} per tile on the CPU; "
                                                          f"{_gb(host_free)} available"))
    if limits:
        fits, why = min(limits)
        if batch > fits:
            log.warning("--batch-size %d does not fit in memory (%s): using %d", requested, why, max(1, fits))
            batch = max(1, fits)
    return batch
