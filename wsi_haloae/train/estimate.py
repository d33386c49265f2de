"""How long a training run will take, said before it starts, and a warning when a CPU is the wrong place for it.

The paper schedule (250 epochs × 3000 originals / 4 per step = 187,500 steps of 12 images) takes about a year
on a 2-core CPU: nobody should find that out from a progress bar. Before the first step we count the FLOPs of
one training step (forward of the 3B images, the three losses, backward) on the meta device — instant, no
weights — and divide by a CPU rate measured on the spot (a short fp32 matmul) times the fraction of it the
training step reaches (``CPU_EFFICIENCY``, measured with benchmarks/bench_train.py). After the first real steps
the trainer replaces that guess with their measured time (``StepClock``).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig

log = logging.getLogger(__name__)

#: Fraction of the fp32 matmul rate (wall clock, same moment) a training step reaches on a CPU: the low and
#: high ends measured by benchmarks/bench_train.py on the shared 2-core machine (tiny 0.16-0.20, paper 0.56;
#: RESULTS.md section 5).
CPU_EFFICIENCY = (0.15, 0.65)
#: Above this many hours, a CPU run gets a warning that names the GPU and the smaller presets.
LONG_RUN_HOURS = 3.0


@functools.lru_cache(maxsize=8)
def train_step_flops(cfg: ModelConfig, batch_size: int) -> int:
    """FLOPs of one training step of ``batch_size`` originals (3·batch_size images), counted on the meta device."""
    from ..model.haloae import HaloAE
    from .losses import reconstruction_loss

    with torch.device("meta"):
        model = HaloAE(cfg).train()
        x = torch.empty(3 * batch_size, 3, cfg.tile_size, cfg.tile_size)
        labels = torch.zeros(3 * batch_size, dtype=torch.long)
    b = batch_size
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        loss = (F.cross_entropy(out.logits, labels) + reconstruction_loss(out.fm_hat[:b], out.fm[:b])
                + reconstruction_loss(out.image_hat[:b], model.normalize(x[:b])))
        loss.backward()
    return int(fc.get_total_flops())


@functools.lru_cache(maxsize=1)
def matmul_rate(seconds: float = 0.3, n: int = 1024) -> float:
    """fp32 FLOP/s of a square matmul on this CPU with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    it, t0 = 0, time.perf_counter()
    while True:
        a @ b
        it += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and it >= 2:
            return 2 * n**3 * it / dt


def hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def warn_if_long_on_cpu(model_cfg: ModelConfig, batch_size: int, steps: int, device: torch.device) -> tuple[float, float] | None:
    """Log an estimate (low, high seconds) of ``steps`` training steps on a CPU; warn when it exceeds LONG_RUN_HOURS.

    Returns the estimate, or None on a GPU (there the progress bar's rate, after a few steps, is the estimate).
    """
    if device.type != "cpu" or steps <= 0:
        return None
    flops = train_step_flops(model_cfg, batch_size)
    rate = matmul_rate()
    low, high = (flops * steps / (rate * e) for e in reversed(CPU_EFFICIENCY))
    msg = (f"estimated duration on this CPU: {hours(low)} – {hours(high)} for {steps:,} steps "
           f"({flops / 1e9:,.0f} GFLOP per step of {3 * batch_size} images; matmul {rate / 1e9:.0f} GFLOP/s on "
           f"{torch.get_num_threads()} thread(s))")
    if high > LONG_RUN_HOURS * 3600:
        log.warning(
            "%s. That is a GPU job: run it with --device cuda on a GPU machine (an H100/H200 does the paper schedule "
            "in about an hour), or use a smaller preset (--preset tiny, or r31) and fewer --epochs / "
            "--samples-per-epoch on this CPU", msg)
    else:
        log.info("%s", msg)
    return low, high


class StepClock:
    """Measures real step times and logs the remaining duration once, after the first few steps (the first is
    excluded: it includes worker start-up and one-time allocation)."""

    def __init__(self, total_steps: int, first_step: int, after: int = 3) -> None:
        self.total, self.first, self.after = total_steps, first_step, after
        self.t0: float | None = None
        self.reported = False

    def tick(self, step: int) -> None:
        if self.reported:
            return
        if step == self.first + 1:
            self.t0 = time.perf_counter()
        elif self.t0 is not None and step >= self.first + 1 + self.after:
            per_step = (time.perf_counter() - self.t0) / (step - self.first - 1)
            left = max(0, self.total - step)
            log.info("measured %.2f s per step: about %s for the remaining %s steps", per_step, hours(per_step * left), f"{left:,}")
            self.reported = True
