"""The ``train`` command: HaloAE on normal tiles with Cut&Paste self-supervision and the evolving weighting scheme.

One step sees B originals plus their Cut&Paste "normal" and "scar" versions (3B images). The loss is
α1·CE(classifier, original=0 / pasted=1) over all 3B images + α2·(MSE + 1 − SSIM)(fm, f̂m) + α3·(MSE + 1 −
SSIM)(normalised image, reconstruction), the last two on the originals only; (α1, α2, α3) follow the EWS.

Reproducibility: data order and augmentation are functions of (seed, epoch, sample index), the model is built
under ``torch.manual_seed(seed)``, and every ``checkpoint_minutes`` and at every epoch end a resume file
(model, optimizer state, RNG states, epoch and batch within it, the epoch's running loss sums) is written
atomically, so ``--resume`` continues an interrupted run, even from the middle of an epoch, to the same weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..config import TrainConfig
from ..errors import BadInputError, OutputError
from ..fileio import guard_outputs, output_lock, write_text_atomic
from .data import CutPasteDataset, EpochSampler, PlainTiles, TileSet, load_tiles, training_mpp
from .batchnorm import refresh_batchnorm
from .calibration import calibrate_holdout
from .estimate import StepClock, warn_if_long_on_cpu
from .ews import weights_for
from .holdout import split_holdout
from .losses import reconstruction_loss
from .stain import setup_stain
from ..model.checkpoint import is_model_file, write_safetensors
from ..model.device import resolve_device

log = logging.getLogger(__name__)

#: Config fields that must match for ``--resume`` (device, workers and max_steps may change between runs).
RESUME_KEYS = ("preset", "epochs", "samples_per_epoch", "batch_size", "backbone_weights", "seed", "lr", "weight_decay", "jitter",
               "stain_normalize", "stain_augment", "val_fraction")
RESUME_FORMAT = "wsi-haloae-resume/1"


@dataclass(frozen=True)
class StepOptions:
    """How a training step runs on its device. On CUDA: bf16 autocast for the forward pass (losses stay float32)
    and channels_last (cuDNN's fast convolution layout); on a CPU neither (no native bf16 on the development CPU,
    where bf16 autocast is 35-60 % slower: benchmarks/RESULTS.md)."""

    bf16: bool = False
    channels_last: bool = False

    @classmethod
    def for_device(cls, device: torch.device) -> "StepOptions":
        cuda = device.type == "cuda"
        return cls(bf16=cuda, channels_last=cuda)


def prepare_model(model: torch.nn.Module, opts: StepOptions, compile: bool = False) -> torch.nn.Module:
    """Put the model in the step's memory layout; returns what to call for the forward pass (compiled with
    ``torch.compile`` when asked: static shapes, so the last short batch of an epoch compiles once more).
    Weights are shared: save and resume from ``model`` itself."""
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model, dynamic=False)
    return model


@contextlib.contextmanager
def _sigterm_requests_stop():
    """SIGTERM (what SLURM and other schedulers send before killing a job at its time limit) sets a flag
    instead of killing the run, so that the next step boundary can write a resume file and stop; yields a
    one-element list holding the flag. Only in the main thread (where Python delivers signals)."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001
        flag[0] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers outlive a scheduler's SIGTERM (sent to the whole job), so the main process can still
    reach its next step boundary and write the resume file."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def sidecar(out: Path, suffix: str) -> Path:
    """model.safetensors → model<suffix> (e.g. model.metrics.jsonl, model.resume.safetensors)."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + suffix)


def _check_out(out: Path, cfg: TrainConfig) -> None:
    """Before any work: the outputs touch no input, ``--out`` replaces only a model file, the folder is writable."""
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as model.safetensors")
    weights = cfg.backbone_weights if cfg.backbone_weights not in ("imagenet", "random") else None
    guard_outputs({"--out": out, "the resume file": sidecar(out, ".resume.safetensors"),
                   "the metrics file": sidecar(out, ".metrics.jsonl")},
                  {"tile folder": Path(cfg.tiles), "backbone weights": Path(weights) if weights else None})
    if out.exists() and not is_model_file(out):
        raise OutputError(f"{out}: exists and is not a wsi-haloae model file; refusing to overwrite it (choose another "
                          "--out, or remove it yourself)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{out.parent}: cannot write the model there ({exc.strerror or exc})") from None


def _fingerprint(cfg: TrainConfig, tiles: TileSet) -> dict[str, Any]:
    d = {k: getattr(cfg, k) for k in RESUME_KEYS}
    d["tiles"] = str(tiles.root.resolve())
    d["tiles_hash"] = tiles.fingerprint()
    return d


# ----------------------------------------------------------------------------------------------- resume file
def _write_resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Model state, Adam state (flattened to tensors), RNG states and progress, in one atomic safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().to("cpu").clone().contiguous()
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt.{pid}.{k}"] = t.detach().to("cpu").clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    meta = dict(info, format=RESUME_FORMAT, param_groups=groups, version=__version__)
    write_safetensors(path, tensors, {"resume": json.dumps(meta)}, "the resume file")


def _read_resume(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["resume"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable resume file ({exc})") from None
    if meta.get("format") != RESUME_FORMAT:
        raise BadInputError(f"{path}: not a wsi-haloae resume file")
    return tensors, meta


def _restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_sd, strict=True)
    except RuntimeError as exc:
        raise BadInputError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    cur = opt.state_dict()
    groups = [dict(g, **saved) for g, saved in zip(cur["param_groups"], meta["param_groups"], strict=True)]
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------------- training
def _train_one_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    sampler: EpochSampler,
    epoch: int,
    cfg: TrainConfig,
    device: torch.device,
    bar: tqdm,
    step: int,
    start: int = 0,
    partial: tuple[dict[str, float], int] | None = None,
    on_step: Callable[[int, int, int, dict[str, float], int], None] | None = None,
    opts: StepOptions | None = None,
    deadline: float | None = None,
) -> tuple[dict[str, float], int, bool]:
    """One epoch, or its rest from batch ``start`` (a resumed run, with the loss sums so far in ``partial``);
    returns (mean losses and accuracy, global step, stopped early by max_steps). ``on_step(epoch, batches done
    in the epoch, step, sums, n)`` runs after every optimizer step (the timed checkpoints). ``model`` may be the
    compiled module of ``prepare_model``; ``opts`` defaults to ``StepOptions.for_device(device)``. The epoch
    stops early at ``cfg.max_steps`` or at ``deadline`` (a ``time.monotonic()`` value)."""
    sampler.set_epoch(epoch, start * cfg.batch_size)
    steps_per_epoch = math.ceil(cfg.samples_per_epoch / cfg.batch_size)
    sums = {"loss": 0.0, "loss_cls": 0.0, "loss_fm": 0.0, "loss_im": 0.0, "cls_acc": 0.0}
    n = 0
    if partial is not None:
        sums, n = dict(partial[0]), int(partial[1])
    alphas = weights_for(epoch + start / steps_per_epoch, cfg.epochs)
    opts = opts or StepOptions.for_device(device)
    layout = torch.channels_last if opts.channels_last else torch.contiguous_format
    model.train()
    for i, (orig, normal, scar) in enumerate(loader, start=start):
        if (cfg.max_steps is not None and step >= cfg.max_steps) or (deadline is not None and time.monotonic() >= deadline):
            return _means(sums, n, alphas), step, True
        alphas = weights_for(epoch + i / steps_per_epoch, cfg.epochs)
        b = orig.shape[0]
        # one batch of 3B images: the frozen VGG runs once on all three views together (see docs/training.md)
        x = torch.cat([orig, normal, scar]).to(device, non_blocking=True).contiguous(memory_format=layout)
        labels = torch.cat([torch.zeros(b, dtype=torch.long), torch.ones(2 * b, dtype=torch.long)]).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=opts.bf16):
            out = model(x)
        # losses in float32: SSIM's small differences of large sums are not safe in bf16
        l_cls = F.cross_entropy(out.logits.float(), labels)
        l_fm = reconstruction_loss(out.fm_hat[:b].float(), out.fm[:b].float())
        l_im = reconstruction_loss(out.image_hat[:b].float(), model.preprocess(x[:b]).float())
        loss = alphas[0] * l_cls + alphas[1] * l_fm + alphas[2] * l_im
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        acc = (out.logits.argmax(1) == labels).float().mean()
        vals = {"loss": loss.item(), "loss_cls": l_cls.item(), "loss_fm": l_fm.item(), "loss_im": l_im.item(), "cls_acc": acc.item()}
        if not all(math.isfinite(v) for v in vals.values()):
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {step}: {vals}")
        for k, v in vals.items():
            sums[k] += v
        n += 1
        bar.update(1)
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        bar.set_postfix_str(
            f"step {step} cls {vals['loss_cls']:.3f} fm {vals['loss_fm']:.3f} im {vals['loss_im']:.3f} "
            f"α {alphas[0]:.2f}/{alphas[1]:.2f}/{alphas[2]:.2f}",
            refresh=False,
        )
        if on_step is not None:
            on_step(epoch, i + 1, step, sums, n)
    return _means(sums, n, alphas), step, False


def _means(sums: dict[str, float], n: int, alphas: tuple[float, float, float]) -> dict[str, float]:
    d = {k: (v / n if n else float("nan")) for k, v in sums.items()}
    d["alpha_cls"], d["alpha_fm"], d["alpha_im"] = alphas
    return d


@torch.no_grad()
def training_mean_map(model: torch.nn.Module, tiles: TileSet, device: torch.device, batch_size: int, workers: int) -> torch.Tensor:
    """Mean raw anomaly map (64, 64) of the training tiles in eval mode, float32 — what post-processing subtracts."""
    model.eval()
    loader = DataLoader(PlainTiles(tiles), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    total: torch.Tensor | None = None
    count = 0
    for x in tqdm(loader, desc="mean anomaly map", unit="batch", leave=False):
        a = model.anomaly_map(x.to(device, non_blocking=True)).double().sum(0)
        total = a if total is None else total + a
        count += x.shape[0]
    assert total is not None
    return (total / count).float().cpu()


def _write_metrics(path: Path, keep_before: int | None) -> None:
    """Start the metrics file afresh, or keep only the epochs before ``keep_before`` (a resumed run)."""
    lines: list[str] = []
    if keep_before is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] < keep_before:
                    lines.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    write_text_atomic(path, "".join(line + "\n" for line in lines), "the metrics file")


def _append_metrics(path: Path, stats: dict[str, Any]) -> None:
    """Add one epoch's line; the file is rewritten whole (a few kB), so a full disk never leaves half a line."""
    old = path.read_text() if path.is_file() else ""
    write_text_atomic(path, old + json.dumps(stats) + "\n", "the metrics file")


def run_train(cfg: TrainConfig) -> Path:
    """Train, then store the model with the training tiles' mean anomaly map; returns the model path.

    Outputs are checked and locked before any work; a failed write (full disk) ends in one line that says
    the last resume checkpoint is kept, so no finished step before it is lost.
    """
    out = Path(cfg.out)
    resolve_device(cfg.device)
    _check_out(out, cfg)
    training_mpp(Path(cfg.tiles))  # an implausible mpp in tiles.csv is refused now, not after the training
    resume_path = sidecar(out, ".resume.safetensors")
    with output_lock(out, "model file"):
        try:
            return _train(cfg)
        except OutputError as exc:
            if not resume_path.is_file():
                raise
            raise OutputError(f"{exc}; {resume_path} (the last checkpoint) is kept: free space, then rerun "
                              "with --resume") from None


def _train(cfg: TrainConfig) -> Path:
    from ..model import build_model
    from ..model.checkpoint import save_model

    t0 = time.time()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    resume_path = sidecar(out, ".resume.safetensors")
    metrics_path = sidecar(out, ".metrics.jsonl")
    if cfg.resume and not resume_path.is_file():
        raise BadInputError(f"{resume_path}: no resume file to continue from (run without --resume to start)")
    tiles = load_tiles(cfg.tiles)
    fingerprint = _fingerprint(cfg, tiles)
    holdout = split_holdout(tiles, cfg.val_fraction, cfg.seed)  # calibration tiles: out of training and mean map
    tiles = holdout.train

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.preset, cfg.backbone_weights, seed=cfg.seed).to(device)
    stain_meta = setup_stain(model, tiles, cfg, device)  # before --resume restores the same buffers
    opts = StepOptions.for_device(device)
    forward = prepare_model(model, opts, cfg.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start_epoch, start_batch, partial, step, elapsed_before = 0, 0, None, 0, 0.0
    if cfg.resume:
        tensors, meta = _read_resume(resume_path)
        diffs = [f"{k}: {meta['config'].get(k)!r} → {v!r}" for k, v in fingerprint.items() if meta["config"].get(k) != v]
        if diffs:
            raise BadInputError(f"{resume_path}: written for a different configuration ({'; '.join(diffs)}); use the same options or start without --resume")
        _restore(tensors, meta, model, opt, resume_path)
        start_epoch, step, elapsed_before = int(meta["epoch"]), int(meta["step"]), float(meta.get("wall_time_s", 0.0))
        start_batch = int(meta.get("batch", 0))  # > 0: written inside an epoch by a timed checkpoint
        if start_batch:
            partial = (meta["sums"], int(meta["n"]))
        log.info("resuming %s at epoch %d/%d, batch %d (step %d)", resume_path, start_epoch + 1, cfg.epochs, start_batch, step)
        del tensors
    elif resume_path.exists():
        log.warning("%s exists from an earlier run; starting afresh (pass --resume to continue it)", resume_path)
    _write_metrics(metrics_path, start_epoch if cfg.resume else None)

    dataset = CutPasteDataset(tiles, cfg.samples_per_epoch, cfg.seed, cfg.jitter, cfg.stain_augment)
    sampler = EpochSampler(cfg.samples_per_epoch)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
        worker_init_fn=_ignore_sigterm,
    )
    steps_per_epoch = math.ceil(cfg.samples_per_epoch / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    log.info(
        "training %s on %s: %d tiles, %d epochs × %d originals = %s optimizer steps of %d images (%d originals + their "
        "2 Cut&Paste versions), device %s",
        cfg.preset, tiles.root, len(tiles), cfg.epochs, cfg.samples_per_epoch, f"{total:,}", 3 * cfg.batch_size,
        cfg.batch_size, device,
    )
    warn_if_long_on_cpu(model.config, cfg.batch_size, total - step, device)
    clock = StepClock(total, step)
    last_checkpoint = time.monotonic()
    saved_step = step if cfg.resume else None  # the step the resume file on disk continues from
    deadline = time.monotonic() + cfg.max_seconds if cfg.max_seconds is not None else None

    def timed_checkpoint(epoch: int, batches_done: int, step_now: int, sums: dict[str, float], n: int) -> None:
        """Every ``checkpoint_minutes``, a resume file from inside the epoch (epoch ends write their own);
        after a SIGTERM, one at once, then stop as an interrupt does."""
        nonlocal last_checkpoint, saved_step
        clock.tick(step_now)
        timed = batches_done < steps_per_epoch and time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_minutes
        if not (timed or sigterm[0]):
            return
        info = {"epoch": epoch, "batch": batches_done, "step": step_now, "sums": sums, "n": n, "config": fingerprint,
                "wall_time_s": elapsed_before + time.time() - t0}
        _write_resume(resume_path, model, opt, info)
        last_checkpoint, saved_step = time.monotonic(), step_now
        if sigterm[0]:
            log.warning("SIGTERM: wrote %s at step %d", resume_path, step_now)
            raise KeyboardInterrupt

    epochs_done = start_epoch
    with _sigterm_requests_stop() as sigterm, tqdm(total=total, initial=min(step, total), unit="step", dynamic_ncols=True) as bar:
        try:
            for epoch in range(start_epoch, cfg.epochs):
                te = time.time()
                first = epoch == start_epoch
                stats, step, stopped = _train_one_epoch(
                    forward, opt, loader, sampler, epoch, cfg, device, bar, step,
                    start=start_batch if first else 0, partial=partial if first else None, on_step=timed_checkpoint,
                    opts=opts, deadline=deadline,
                )
                if stopped:
                    log.warning("stopping at step %d inside epoch %d (max_steps=%s, max_seconds=%s)", step, epoch + 1,
                                cfg.max_steps, cfg.max_seconds)
                    break
                epochs_done = epoch + 1
                stats = {"epoch": epoch, "step": step, **stats, "seconds": round(time.time() - te, 3)}
                _append_metrics(metrics_path, stats)
                info = {"epoch": epochs_done, "batch": 0, "step": step, "config": fingerprint, "wall_time_s": elapsed_before + time.time() - t0}
                _write_resume(resume_path, model, opt, info)
                last_checkpoint, saved_step = time.monotonic(), step
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
        except KeyboardInterrupt:
            if saved_step is None:
                log.warning("interrupted before the first checkpoint (every %g min and at epoch ends): nothing to resume", cfg.checkpoint_minutes)
            else:
                log.warning("interrupted; --resume continues from the last checkpoint, step %d of %d", saved_step, total)
            raise

    bn_tiles = refresh_batchnorm(model, tiles, device, 3 * cfg.batch_size, cfg.workers, seed=cfg.seed) if cfg.refresh_bn else 0
    mean_map = training_mean_map(model, tiles, device, batch_size=max(8, 3 * cfg.batch_size), workers=cfg.workers)
    calibration = calibrate_holdout(model, mean_map, holdout, device, Path(cfg.tiles), max(8, 3 * cfg.batch_size), cfg.workers)
    wall = elapsed_before + time.time() - t0
    metadata = {
        "preset": cfg.preset,
        "train": {**{k: v for k, v in asdict(cfg).items() if k not in ("tiles", "out", "resume", "device", "workers", "checkpoint_minutes")}},
        "epochs": epochs_done,
        "steps": step,
        "seed": cfg.seed,
        "samples_per_epoch": cfg.samples_per_epoch,
        "batch_size": cfg.batch_size,
        "tile_count": len(tiles),
        "tiles_skipped": tiles.skipped,
        "data": str(tiles.root.resolve()),
        "mpp": training_mpp(Path(cfg.tiles)),
        "stain": stain_meta,
        "version": __version__,
        "device": str(device),
        "wall_time_s": round(wall, 1),
        "batchnorm": f"recomputed on {bn_tiles} training tiles" if bn_tiles else "running averages of training",
        "holdout": holdout.describe(),
        "calibration": calibration,
    }
    save_model(out, model, mean_map, metadata)
    if epochs_done >= cfg.epochs:
        resume_path.unlink(missing_ok=True)
    elif resume_path.is_file():  # stopped by max_steps before the schedule's end: keep the way to continue it
        log.info("kept %s: the schedule has %d more epoch(s); --resume continues it", resume_path, cfg.epochs - epochs_done)
    log.info("wrote %s (%d epochs, %d steps, %.0f s)", out, epochs_done, step, wall)
    return out
