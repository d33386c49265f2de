"""Learning curve: HaloAE trained by the real trainer, scored every few hundred steps, against a same-backbone PaDiM.

One run = one preset (``tiny`` or ``r31``) on one data set: ``tissue`` (real H&E tiles with five kinds of
planted anomalies, benchmarks/planted.py) or ``bottle`` (MVTec-AD bottle). The model is trained by
``wsi_haloae.train.trainer.run_train`` — the code ``wsi-haloae train`` runs — as ONE schedule of
``--total-steps`` optimizer steps (the EWS loss weights follow that length), stopped at each checkpoint
step with ``max_steps`` and continued with ``resume``: an epoch is made exactly as long as the gap between
checkpoints, so every stop falls on an epoch end, where the trainer's resume file is bit-exact. At each
checkpoint the trainer's model file (with its training mean map) is scored on the fixed evaluation set:

- tissue: tile AUROC per anomaly kind against the normal test tiles (score = mean of the post-processed
  map; max too), pixel AUROC per kind and overall, AUPRO;
- bottle: what ``wsi-haloae evaluate`` reports (image AUROC mean/max, exact pixel AUROC at 900², AUPRO),
  computed the same way (resize to 256, post-process with the model's mean map, bilinear up-sampling,
  ``wsi_haloae.metrics``; tests/test_learning_curve.py checks the figures equal ``run_evaluate``'s).

The PaDiM of the same backbone (benchmarks/padim.py) is fitted on the same training tiles and scored on the
same images once per run. Every checkpoint is appended to the JSON as soon as it is scored (a crash loses
nothing); re-running the same command continues where it stopped (the trainer's resume file).

    python benchmarks/learning_curve.py --preset tiny --data tissue           # one run (hours on a CPU)
    python benchmarks/learning_curve.py --report                              # figures + table from the JSONs
    python benchmarks/learning_curve.py --quick --out /tmp/lc.json            # a smoke run in a minute

CPU time is the process's own (``resource.getrusage``; DataLoader workers 0, so nothing runs elsewhere),
which other load on a shared machine distorts little; the checkpoints are fixed STEP counts, so contention
changes the wall time, never the figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common  # noqa: E402

RESULTS = _common.REPO / "benchmarks" / "results"
FIGURES = RESULTS
DEFAULT_WORKDIR = _common.REPO / "benchmarks" / "out" / "learning_curve"
IMAGENET_RELU31 = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")
#: Default schedules (total steps, checkpoints, originals per step): ≥ 60 CPU minutes of optimizer steps on the
#: 2-core development CPU with one thread (tiny ≈ 7 CPU-s per step of 4 originals, r31 ≈ 57 CPU-s per step of 4,
#: ≈ 29 of 2). r31 takes 2 originals (6 images) per step: at the paper's 4 its training peaks near 10 GB of RSS
#: and was OOM-killed on the shared 24 GB machine; 2 halves that and sees the same originals per CPU minute.
SCHEDULES = {
    "tiny": (600, [0, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600], 4),
    "r31": (144, [0, 24, 48, 72, 96, 120, 144], 2),
}
BATCH = 8  # evaluation batch (images)

log = logging.getLogger("learning_curve")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------------------------- data sets
@dataclass
class DataSet:
    name: str  # "tissue" | "bottle"
    root: Path  # MVTec layout: train/good, test/<kind>, ground_truth/<kind>
    info: dict[str, Any]


@contextlib.contextmanager
def _locked(root: Path):
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_data(args) -> DataSet:
    import planted

    if args.data == "tissue":
        root = args.workdir / ("tissue-set-quick" if args.quick else "tissue-set")
        with _locked(root):  # two runs started together build the set once
            if args.quick:
                man = planted.build_small_set(root, seed=args.seed)
            else:
                shared = _common.SHARED_DATA
                if not shared.joinpath(*planted.CMU).is_file():
                    sys.exit(f"error: {shared.joinpath(*planted.CMU)}: not found (the tissue set needs ../shared/data)")
                man = planted.build_tissue_set(root, shared, seed=args.seed)
        info = {"root": str(root), "n_train": man["n_train"], "n_test_good": man["n_test_good"],
                "n_test": len(man["test"]), "test_sha256": man["test_sha256"], "train_sha256": man["train_sha256"],
                "settings": man["settings"], "sources": man["sources"]}
        return DataSet("tissue", root, info)
    if args.quick:  # the smoke run reads the small planted set as an MVTec-layout folder
        root = args.workdir / "tissue-set-quick"
        with _locked(root):
            planted.build_small_set(root, seed=args.seed)
    else:
        root = Path(args.data_dir) if args.data_dir else _common.SHARED_DATA / "mvtec_ad" / "bottle"
        if not (root / "test").is_dir():
            sys.exit(f"error: {root}: not an MVTec-AD category folder (no test/)")
    info = {"root": str(root), "n_train": len(list((root / "train" / "good").glob("*.png"))),
            "n_test": sum(1 for _ in (root / "test").rglob("*.png")), "test_sha256": planted.folder_hash(root, "test")}
    return DataSet("bottle", root, info)


# ----------------------------------------------------------------------------------------------- scoring
def _images(items, start: int, stop: int) -> tuple[list[np.ndarray], torch.Tensor]:
    from wsi_haloae.train.data import TILE_SIZE, read_rgb, resize_rgb, to_tensor

    full = [read_rgb(it.path) for it in items[start:stop]]
    return full, torch.stack([to_tensor(resize_rgb(a, TILE_SIZE)) for a in full])


def _mask(item, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if item.mask is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(item.mask) as im:
        return np.asarray(im.convert("L")) > 127


def score_set(root: Path, map_fn: Callable[[torch.Tensor], torch.Tensor], per_kind_pixels: bool) -> dict[str, Any]:
    """Score every test image of an MVTec-layout folder with ``map_fn`` (RGB [0,1] batch → post-processed
    (N, 64, 64) maps), as ``wsi-haloae evaluate`` does: image scores = mean / max of the 64² map, pixel
    scores = the map bilinearly up-sampled to the image's own size."""
    import torch.nn.functional as F

    from wsi_haloae.evaluate import find_test_set
    from wsi_haloae.metrics import PixelScores, image_auroc

    items = find_test_set(root)
    kinds = sorted({it.defect for it in items if it.anomalous})
    overall = PixelScores()
    per_kind = {k: PixelScores() for k in kinds} if per_kind_pixels else {}
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), BATCH):
        full, x = _images(items, start, start + BATCH)
        with torch.no_grad():
            pp = map_fn(x).float()
        for it, arr, m in zip(items[start : start + BATCH], full, pp, strict=True):
            shape = arr.shape[:2]
            up = F.interpolate(m[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            gt = _mask(it, shape)
            overall.add(up, gt)
            for k, acc in per_kind.items():
                if it.defect in (k, "good"):
                    acc.add(up, gt)
            rows.append({"file": str(it.path.relative_to(root)), "kind": it.defect,
                         "mean": float(m.mean()), "max": float(m.max())})
    labels = [int(r["kind"] != "good") for r in rows]
    out: dict[str, Any] = {
        "image_auroc": image_auroc(labels, [r["mean"] for r in rows]),
        "image_auroc_max": image_auroc(labels, [r["max"] for r in rows]),
        "pixel_auroc": overall.pixel_auroc(),
        "aupro": overall.aupro(0.3),
        "per_kind": {},
        "images": rows,
    }
    del overall
    for k in kinds:
        sel = [r for r in rows if r["kind"] in (k, "good")]
        lab = [int(r["kind"] == k) for r in sel]
        out["per_kind"][k] = {"image_auroc": image_auroc(lab, [r["mean"] for r in sel]),
                              "image_auroc_max": image_auroc(lab, [r["max"] for r in sel]),
                              "n": sum(lab)}
        if k in per_kind:
            out["per_kind"][k]["pixel_auroc"] = per_kind[k].pixel_auroc()
    return out


@torch.no_grad()
def reconstruction_stats(net, root: Path, n: int = 8) -> dict[str, float]:
    """How far the auto-encoder is from reconstructing fm on a few normal test images: the share of fm's
    variance f̂m explains (R², per channel around its mean) and f̂m's energy relative to fm's."""
    from wsi_haloae.evaluate import find_test_set

    items = [it for it in find_test_set(root) if not it.anomalous][:n]
    _, x = _images(items, 0, len(items))
    fm, fm_hat = net.reconstruct(x)
    fm, fm_hat = fm.double(), fm_hat.double()
    centred = fm - fm.mean(dim=(0, 2, 3), keepdim=True)
    sse = (fm - fm_hat).pow(2).sum().item()
    sst = centred.pow(2).sum().item()
    return {"r2": 1 - sse / sst, "energy_ratio": fm_hat.pow(2).sum().item() / fm.pow(2).sum().item(),
            "corr": float(torch.corrcoef(torch.stack([fm.flatten(), fm_hat.flatten()]))[0, 1])}


def training_batches(root: Path):
    """The training tiles as the trainer reads them (``load_tiles``: decoded, resized to 256), in batches."""
    from wsi_haloae.train.data import load_tiles, to_tensor

    tiles = load_tiles(root, progress=False)
    for s in range(0, len(tiles), BATCH):
        yield torch.stack([to_tensor(tiles.get(i)) for i in range(s, min(s + BATCH, len(tiles)))])


def strip_images(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k != "images"}


# ----------------------------------------------------------------------------------------------- training
class Timers:
    """CPU seconds spent inside the trainer's tile loading and mean-map computation (wrapped, not changed),
    so that optimizer-step CPU can be told from the rest of a ``run_train`` call."""

    def __init__(self) -> None:
        self.mean_map = 0.0
        self.load_tiles = 0.0

    @contextlib.contextmanager
    def wrap(self):
        from wsi_haloae.train import trainer

        real_mm, real_lt = trainer.training_mean_map, trainer.load_tiles

        def mm(*a, **k):
            c = cpu_s()
            try:
                return real_mm(*a, **k)
            finally:
                self.mean_map += cpu_s() - c

        def lt(*a, **k):
            c = cpu_s()
            try:
                return real_lt(*a, **k)
            finally:
                self.load_tiles += cpu_s() - c

        trainer.training_mean_map, trainer.load_tiles = mm, lt
        try:
            yield self
        finally:
            trainer.training_mean_map, trainer.load_tiles = real_mm, real_lt


def epoch_steps(checkpoints: list[int]) -> int:
    """Steps per epoch: the largest that puts every checkpoint on an epoch end (their gcd)."""
    return math.gcd(*[c for c in checkpoints if c > 0]) if any(checkpoints) else 1


def model_steps(path: Path) -> int | None:
    from wsi_haloae.model.checkpoint import read_header

    if not path.is_file():
        return None
    return int(json.loads(read_header(path).get("metadata", "{}")).get("steps", -1))


def train_to(step: int, run: dict[str, Any], data: DataSet, model_path: Path, timers: Timers) -> dict[str, Any]:
    """Continue the run's one schedule up to ``step`` through ``run_train``; returns CPU and loss facts."""
    from wsi_haloae.config import TrainConfig
    from wsi_haloae.train.trainer import run_train, sidecar

    cfg = run["config"]
    resume_path = sidecar(model_path, ".resume.safetensors")
    resume = resume_path.is_file()
    if not resume and run["checkpoints"] and run["checkpoints"][-1]["step"] > 0:
        raise SystemExit(
            f"error: {resume_path}: missing, so step {run['checkpoints'][-1]['step']} cannot be continued "
            "(the trainer deletes its resume file when a run ends); start a new --workdir"
        )
    tc = TrainConfig(
        tiles=data.root, out=model_path, preset=cfg["preset"], epochs=cfg["epochs"],
        samples_per_epoch=cfg["samples_per_epoch"], batch_size=cfg["batch_size"],
        backbone_weights=cfg["backbone_weights"], device="cpu", workers=0, seed=cfg["seed"],
        resume=resume, max_steps=step,
    )
    mm0, lt0, c0, t0 = timers.mean_map, timers.load_tiles, cpu_s(), time.time()
    with timers.wrap():
        run_train(tc)
    call = cpu_s() - c0
    mm, lt = timers.mean_map - mm0, timers.load_tiles - lt0
    return {"call_cpu_s": call, "mean_map_cpu_s": mm, "load_tiles_cpu_s": lt, "step_cpu_s": call - mm - lt,
            "wall_s": time.time() - t0, "resumed": resume}


def read_metrics(model_path: Path) -> list[dict[str, Any]]:
    from wsi_haloae.train.trainer import sidecar

    p = sidecar(model_path, ".metrics.jsonl")
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- one run
def run_config(args, data: DataSet) -> dict[str, Any]:
    total, checkpoints = args.total_steps, args.checkpoints
    k = epoch_steps(checkpoints)
    if total % k:
        sys.exit(f"error: --total-steps {total} is not a multiple of the checkpoint spacing {k}")
    weights = args.backbone_weights
    return {"preset": args.preset, "data": data.name, "total_steps": total, "checkpoints": checkpoints,
            "epochs": total // k, "steps_per_epoch": k, "samples_per_epoch": k * args.batch_size,
            "batch_size": args.batch_size, "seed": args.seed, "backbone_weights": str(weights),
            "padim_dims": args.padim_dims, "threads": torch.get_num_threads(), "workers": 0,
            "test_sha256": data.info["test_sha256"]}


def load_or_start(args, data: DataSet) -> dict[str, Any]:
    cfg = run_config(args, data)
    if args.out.is_file():
        run = json.loads(args.out.read_text())
        if run.get("config") != cfg:
            diff = {k: (run.get("config", {}).get(k), v) for k, v in cfg.items() if run.get("config", {}).get(k) != v}
            sys.exit(f"error: {args.out}: holds a run of another configuration {diff}; choose another --out")
        run.setdefault("sessions", []).append({"command": _common.command_line(), "machine": _common.machine_info("cpu")})
        return run
    return {"benchmark": "learning_curve", "command": _common.command_line(), "quick": bool(args.quick),
            "machine": _common.machine_info("cpu"), "config": cfg, "data": data.info, "padim": None,
            "checkpoints": [], "complete": False, "sessions": []}


def save(run: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(run, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def score_padim(run: dict[str, Any], data: DataSet) -> None:
    from padim import PaDiM

    cfg = run["config"]
    c0, t0 = cpu_s(), time.time()
    pd = PaDiM(cfg["preset"], cfg["backbone_weights"], dims=cfg["padim_dims"], seed=cfg["seed"])
    pd.fit(training_batches(data.root))
    fit_cpu = cpu_s() - c0
    figs = score_set(data.root, pd.map, per_kind_pixels=data.name == "tissue")
    run["padim"] = {"dims": pd.dims, "channels": pd.channels.tolist(), "n_train": pd.n_train,
                    "shrinkage_median": float(np.median(pd.shrinkage)), "fit_cpu_s": fit_cpu,
                    "score_cpu_s": cpu_s() - c0 - fit_cpu, "wall_s": time.time() - t0, **figs}


def score_checkpoint(model_path: Path, data: DataSet) -> dict[str, Any]:
    from wsi_haloae.model import load_model

    loaded = load_model(model_path, "cpu")
    return score_model(loaded.model, loaded.mean_map, data)


def score_model(net: torch.nn.Module, mean_map: torch.Tensor, data: DataSet) -> dict[str, Any]:
    """A model's figures on the run's test set: the post-processed map's scores and the reconstruction."""
    from wsi_haloae.model import postprocess

    net.eval()

    def haloae_map(x: torch.Tensor) -> torch.Tensor:
        return postprocess(net.anomaly_map(x), mean_map)

    figs = score_set(data.root, haloae_map, per_kind_pixels=data.name == "tissue")
    figs["reconstruction"] = reconstruction_stats(net, data.root)
    return figs


def run_curve(args) -> Path:
    torch.set_num_threads(args.threads)
    data = prepare_data(args)
    run = load_or_start(args, data)
    print(f"# {_common.command_line()}", flush=True)
    print(f"# {data.name}: {data.info['root']}  ({data.info['n_train']} training tiles, {data.info['n_test']} test images)  "
          f"load {_common.loadavg()}", flush=True)
    cfg = run["config"]
    rundir = args.workdir / f"{cfg['preset']}-{data.name}{'-quick' if args.quick else ''}"
    ckdir = rundir / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    model_path = rundir / "model.safetensors"
    if run["padim"] is None:
        score_padim(run, data)
        save(run, args.out)
        p = run["padim"]
        print(f"padim d={p['dims']}: image AUROC {p['image_auroc']:.3f} (max {p['image_auroc_max']:.3f}), "
              f"pixel AUROC {p['pixel_auroc']:.3f}, AUPRO {p['aupro']:.3f}  [{p['fit_cpu_s']:.0f} + {p['score_cpu_s']:.0f} CPU-s]", flush=True)
    timers = Timers()
    done = {c["step"] for c in run["checkpoints"]}
    for step in cfg["checkpoints"]:
        if step in done:
            continue
        t0 = time.time()
        if model_steps(model_path) == step:  # trained before a crash, not yet scored
            facts = {"call_cpu_s": 0.0, "mean_map_cpu_s": 0.0, "load_tiles_cpu_s": 0.0, "step_cpu_s": 0.0,
                     "wall_s": 0.0, "resumed": None, "note": "model from an earlier session; its CPU is not counted"}
        else:
            facts = train_to(step, run, data, model_path, timers)
        got = model_steps(model_path)
        if got != step:
            raise SystemExit(f"error: the trainer stopped at step {got}, not {step}")
        keep = ckdir / f"step-{step:06d}.safetensors"
        shutil.copyfile(model_path, keep)
        c0 = cpu_s()
        figs = score_checkpoint(keep, data)
        score_cpu = cpu_s() - c0
        prev = run["checkpoints"][-1] if run["checkpoints"] else None
        cum = (prev["train_cpu_s_cum"] if prev else 0.0) + facts["step_cpu_s"]
        metrics = [m for m in read_metrics(model_path) if m["step"] <= step and (prev is None or m["step"] > prev["step"])]
        entry = {"step": step, "epoch": step // cfg["steps_per_epoch"], "originals_seen": step * cfg["batch_size"],
                 "train_cpu_s_cum": cum, **facts, "score_cpu_s": score_cpu, "checkpoint_wall_s": time.time() - t0,
                 "loadavg": _common.loadavg(), "date_utc": _common.machine_info("cpu")["date_utc"],
                 "model": str(keep), "epochs_metrics": metrics, **figs}
        run["checkpoints"].append(entry)
        save(run, args.out)
        kinds = " ".join(f"{k} {v['image_auroc']:.2f}" for k, v in figs["per_kind"].items())
        print(f"step {step:5d}  train {cum / 60:6.1f} CPU-min  image AUROC {figs['image_auroc']:.3f} "
              f"(max {figs['image_auroc_max']:.3f})  pixel {figs['pixel_auroc']:.3f}  AUPRO {figs['aupro']:.3f}  "
              f"R² {figs['reconstruction']['r2']:.3f}  [{kinds}]  load {entry['loadavg']}", flush=True)
    run["complete"] = True
    run["machine"]["loadavg_end"] = _common.loadavg()
    save(run, args.out)
    print(f"# wrote {args.out}", flush=True)
    return args.out


# ----------------------------------------------------------------------------------- BatchNorm refresh
def bn_refresh_path(results: Path, preset: str, data: str) -> Path:
    return results / f"bn_refresh-{preset}-{data}.json"


def score_with_bn_refresh(model_path: Path, data: DataSet, cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved checkpoint scored as ``train`` now finishes a model: BatchNorm statistics recomputed on the
    training tiles with the final weights (train/batchnorm.py), then the mean map recomputed with them."""
    from wsi_haloae.model import load_model
    from wsi_haloae.train.batchnorm import refresh_batchnorm
    from wsi_haloae.train.data import load_tiles
    from wsi_haloae.train.trainer import training_mean_map

    loaded = load_model(model_path, "cpu")
    net = loaded.model
    tiles = load_tiles(data.root, progress=False)
    c0 = cpu_s()
    n = refresh_batchnorm(net, tiles, torch.device("cpu"), 3 * cfg["batch_size"], 0, seed=cfg["seed"])
    mean_map = training_mean_map(net, tiles, torch.device("cpu"), batch_size=max(8, 3 * cfg["batch_size"]), workers=0)
    refresh_cpu = cpu_s() - c0
    return {"bn_tiles": n, "refresh_and_mean_map_cpu_s": refresh_cpu, **score_model(net, mean_map, data)}


def run_bn_refresh(args) -> Path:
    """Re-score checkpoints of a finished (or running) curve with the BatchNorm refresh; the curve itself ran
    without it, so its rows say what the running averages gave and these what ``train`` gives now."""
    torch.set_num_threads(args.threads)
    if not args.out.is_file():
        sys.exit(f"error: {args.out}: no learning-curve results to re-score")
    run = json.loads(args.out.read_text())
    cfg = run["config"]
    data = prepare_data(args)
    scored = {c["step"] for c in run["checkpoints"]}
    steps = sorted({int(s) for s in args.bn_refresh.split(",")}) if args.bn_refresh != "ends" else \
        sorted({min(scored), max(scored)}) if scored else []
    if not steps or not set(steps) <= scored:
        sys.exit(f"error: --bn-refresh {args.bn_refresh}: steps must be among the scored ones {sorted(scored)}")
    path = bn_refresh_path(args.out.parent, cfg["preset"], data.name + ("-quick" if args.quick else ""))
    res = json.loads(path.read_text()) if path.is_file() else {
        "benchmark": "bn_refresh", "of": args.out.name, "config": cfg, "machine": _common.machine_info("cpu"),
        "checkpoints": []}
    rundir = args.workdir / f"{cfg['preset']}-{data.name}{'-quick' if args.quick else ''}"
    for step in steps:
        if any(c["step"] == step for c in res["checkpoints"]):
            continue
        model = rundir / "checkpoints" / f"step-{step:06d}.safetensors"
        if not model.is_file():
            sys.exit(f"error: {model}: checkpoint not found")
        c0 = cpu_s()
        figs = score_with_bn_refresh(model, data, cfg)
        res["checkpoints"].append({"step": step, "model": str(model), "cpu_s": cpu_s() - c0,
                                   "loadavg": _common.loadavg(), "date_utc": _common.machine_info("cpu")["date_utc"], **figs})
        res["checkpoints"].sort(key=lambda c: c["step"])
        save(res, path)
        print(f"step {step:5d} + BN refresh: image AUROC {figs['image_auroc']:.3f} pixel {figs['pixel_auroc']:.3f} "
              f"AUPRO {figs['aupro']:.3f} R² {figs['reconstruction']['r2']:.3f}", flush=True)
    print(f"# wrote {path}", flush=True)
    return path


# ----------------------------------------------------------------------------------------------- report
KIND_COLOURS = {"foreign": "tab:purple", "crowding": "tab:blue", "ink": "tab:green", "fold": "tab:brown",
                "blur": "tab:gray", "broken_large": "tab:red", "broken_small": "tab:orange", "contamination": "tab:olive"}


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def load_runs(folder: Path, include_quick: bool = False) -> list[dict[str, Any]]:
    runs = []
    for p in sorted(folder.glob("learning_curve-*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r.get("benchmark") == "learning_curve" and (include_quick or not r.get("quick")):
            r["_path"] = str(p)
            bn = bn_refresh_path(folder, r["config"]["preset"], r["config"]["data"] + ("-quick" if r.get("quick") else ""))
            if bn.is_file():
                r["_bn_refresh"] = json.loads(bn.read_text()).get("checkpoints", [])
            runs.append(r)
    order = {"tissue": 0, "bottle": 1, "tiny": 0, "r31": 1}
    return sorted(runs, key=lambda r: (order.get(r["config"]["data"], 9), order.get(r["config"]["preset"], 9)))


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: per run, PaDiM then every checkpoint (tissue: tile AUROC per kind; bottle: evaluate figures)."""
    out: list[str] = []
    for r in runs:
        cfg, pd = r["config"], r.get("padim") or {}
        out.append(f"#### {cfg['preset']} on {cfg['data']} ({Path(r['_path']).name})\n")
        if cfg["data"] == "tissue":
            kinds = list((pd.get("per_kind") or {}).keys()) or list(r["checkpoints"][0]["per_kind"]) if r["checkpoints"] else []
            head = ["model", "step", "train CPU-min", *[f"{k} tile AUROC" for k in kinds], "all tile AUROC (mean / max)",
                    "pixel AUROC", "AUPRO", "R² of f̂m", "load"]
        else:
            kinds = list((pd.get("per_kind") or {}).keys())
            head = ["model", "step", "train CPU-min", "image AUROC (mean / max)", *[f"{k}" for k in kinds],
                    "pixel AUROC", "AUPRO", "R² of f̂m", "load"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" for _ in head) + "|")

        def row(name: str, step: str, cpu: str, f: dict[str, Any], r2: str, load: str) -> str:
            pk = f.get("per_kind", {})
            both = f"{_fmt(f.get('image_auroc'))} / {_fmt(f.get('image_auroc_max'))}"
            per = [_fmt(pk.get(k, {}).get("image_auroc")) for k in kinds]
            if cfg["data"] == "tissue":
                cells = [name, step, cpu, *per, both, _fmt(f.get("pixel_auroc")), _fmt(f.get("aupro")), r2, load]
            else:
                cells = [name, step, cpu, both, *per, _fmt(f.get("pixel_auroc")), _fmt(f.get("aupro")), r2, load]
            return "| " + " | ".join(cells) + " |"

        if pd:
            out.append(row(f"PaDiM d={pd['dims']}", "–", f"fit {pd['fit_cpu_s'] / 60:.1f}", pd, "–", "–"))
        refreshed = {c["step"]: c for c in r.get("_bn_refresh", [])}
        for c in r["checkpoints"]:
            la = c.get("loadavg") or [None]
            out.append(row("HaloAE", str(c["step"]), f"{c['train_cpu_s_cum'] / 60:.1f}", c,
                           _fmt(c.get("reconstruction", {}).get("r2")), f"{la[0]:.1f}" if la[0] is not None else "–"))
            if c["step"] in refreshed:
                b = refreshed[c["step"]]
                lb = b.get("loadavg") or [None]
                out.append(row("HaloAE + BN refresh", str(c["step"]), f"{c['train_cpu_s_cum'] / 60:.1f}", b,
                               _fmt(b.get("reconstruction", {}).get("r2")), f"{lb[0]:.1f}" if lb[0] is not None else "–"))
        out.append("")
    return "\n".join(out)


def plot(runs: list[dict[str, Any]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for data in ("tissue", "bottle"):
        sel = [r for r in runs if r["config"]["data"] == data and r["checkpoints"]]
        if not sel:
            continue
        sel.sort(key=lambda r: ["tiny", "r31"].index(r["config"]["preset"]) if r["config"]["preset"] in ("tiny", "r31") else 9)
        metrics = [("image_auroc", "tile AUROC (score = mean of map)"), ("pixel_auroc", "pixel AUROC")] if data == "tissue" else \
                  [("image_auroc", "image AUROC (mean)"), ("image_auroc_max", "image AUROC (max)"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")]
        fig, axes = plt.subplots(len(metrics) if data == "tissue" else 1, len(sel), figsize=(6.2 * len(sel), 4.2 * (len(metrics) if data == "tissue" else 1)),
                                 squeeze=False)
        for j, r in enumerate(sel):
            steps = [c["step"] for c in r["checkpoints"]]
            cpu_min = [c["train_cpu_s_cum"] / 60 for c in r["checkpoints"]]
            pd = r.get("padim") or {}
            if data == "tissue":
                for i, (key, label) in enumerate(metrics):
                    ax = axes[i][j]
                    kinds = list(r["checkpoints"][0]["per_kind"])
                    for k in kinds:
                        col = KIND_COLOURS.get(k)
                        ys = [c["per_kind"][k].get(key) for c in r["checkpoints"]]
                        ax.plot(steps, ys, "o-", color=col, label=k, ms=3)
                        pv = (pd.get("per_kind") or {}).get(k, {}).get(key)
                        if pv is not None:
                            ax.axhline(pv, color=col, ls="--", lw=1)
                    ys = [c.get(key) for c in r["checkpoints"]]
                    ax.plot(steps, ys, "o-", color="black", lw=2, label="all kinds", ms=3)
                    if pd.get(key) is not None:
                        ax.axhline(pd[key], color="black", ls="--", lw=1.5)
                    ax.set_ylim(0, 1.02)
                    ax.axhline(0.5, color="0.7", lw=0.8, ls=":")
                    ax.set_title(f"{r['config']['preset']} on planted tissue: {label}\n(dashed: PaDiM d={pd.get('dims')}, same backbone)", fontsize=9)
                    ax.set_xlabel(f"training step (batch {r['config']['batch_size']}; last = {cpu_min[-1]:.0f} CPU-min)")
                    if j == 0:
                        ax.legend(fontsize=7, loc="lower left", ncol=2)
            else:
                ax = axes[0][j]
                cols = ["black", "tab:blue", "tab:red", "tab:green"]
                for (key, label), col in zip(metrics, cols):
                    ax.plot(steps, [c.get(key) for c in r["checkpoints"]], "o-", color=col, label=label, ms=3)
                    if pd.get(key) is not None:
                        ax.axhline(pd[key], color=col, ls="--", lw=1)
                ax.set_ylim(0, 1.02)
                ax.axhline(0.5, color="0.7", lw=0.8, ls=":")
                ax.set_title(f"{r['config']['preset']} on MVTec-AD bottle\n(dashed: PaDiM d={pd.get('dims')}, same backbone)", fontsize=9)
                ax.set_xlabel(f"training step (batch {r['config']['batch_size']}; last = {cpu_min[-1]:.0f} CPU-min)")
                ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = folder / f"learning_curve-{data}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    # training losses of every run: what the optimizer saw
    sel = [r for r in runs if r["checkpoints"]]
    if sel:
        fig, axes = plt.subplots(1, 2, figsize=(12.4, 4.0), squeeze=False)
        for r in sel:
            ms = [m for c in r["checkpoints"] for m in c.get("epochs_metrics", [])]
            if not ms:
                continue
            name = f"{r['config']['preset']} {r['config']['data']}"
            axes[0][0].plot([m["step"] for m in ms], [m["loss_fm"] for m in ms], "-", label=name)
            axes[0][1].plot([m["step"] / r["config"]["total_steps"] for m in ms], [m["alpha_fm"] for m in ms], "-", label=name)
        axes[0][0].set_yscale("log")
        axes[0][0].set_title("feature loss MSE + (1 − SSIM)(f̂m, fm), epoch means", fontsize=9)
        axes[0][0].set_xlabel("training step")
        axes[0][1].set_title("EWS weight of the feature loss α2", fontsize=9)
        axes[0][1].set_xlabel("fraction of the run")
        for ax in axes[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / "learning_curve-losses.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def report(args) -> None:
    runs = load_runs(args.results, include_quick=args.include_quick)
    if not runs:
        sys.exit(f"error: {args.results}: no learning_curve-*.json results")
    text = table(runs)
    paths = plot(runs, args.results)
    tissue_set = args.workdir / "tissue-set"
    if (tissue_set / "manifest.json").is_file():  # what the planted anomalies look like
        import planted

        paths.append(planted.contact_sheet(tissue_set, args.results / "planted_examples.jpg", per_kind=2, size=144))
    md = args.results / "learning_curve.md"
    md.write_text(f"<!-- written by: {_common.command_line()} -->\n\n{text}\n")
    print(text)
    for p in [*paths, md]:
        print(f"# wrote {p}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(SCHEDULES), default="tiny")
    p.add_argument("--data", choices=["tissue", "bottle"], default="tissue")
    p.add_argument("--data-dir", help="MVTec-AD category folder for --data bottle (default ../shared/data/mvtec_ad/bottle).")
    p.add_argument("--total-steps", type=int, help="Optimizer steps of the whole schedule (default per preset: tiny 600, r31 144).")
    p.add_argument("--checkpoints", help="Comma-separated steps to score at (default per preset; all multiples of their gcd).")
    p.add_argument("--batch-size", type=int, help="Originals per step; 3x images per step (default per preset: tiny 4, the paper's; r31 2, for memory).")
    p.add_argument("--backbone-weights", help="VGG19 weights (default: the ImageNet file to relu3_1 in ../shared/data; quick: random).")
    p.add_argument("--padim-dims", type=int, default=100, help="PaDiM's random channel subset (default 100, as PaDiM-R18 keeps of 448).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: two runs share the 2 cores).")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="Data sets, models and checkpoints (gitignored).")
    p.add_argument("--out", type=Path, help="Results JSON (default benchmarks/results/learning_curve-<preset>-<data>.json).")
    p.add_argument("--quick", action="store_true", help="Smoke run: small IHC set, random backbone, 2 steps of batch 1.")
    p.add_argument("--report", action="store_true", help="Only redraw the figures and the table from the JSONs in --results.")
    p.add_argument("--results", type=Path, default=RESULTS, help="Folder of the result JSONs (for --report).")
    p.add_argument("--include-quick", action="store_true", help="--report: also read --quick runs (tests).")
    p.add_argument("--bn-refresh", metavar="STEPS", help="Re-score these scored checkpoints ('ends': the first and "
                   "the last) with BatchNorm statistics and mean map recomputed as train now does; results in "
                   "results/bn_refresh-<preset>-<data>.json, shown by --report.")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.report:
        report(args)
        return
    total, checkpoints, batch = SCHEDULES[args.preset]
    args.batch_size = args.batch_size or batch
    if args.quick:
        total, checkpoints = 2, [0, 1, 2]
        args.batch_size = 1
        args.padim_dims = min(args.padim_dims, 16)
        args.backbone_weights = args.backbone_weights or "random"
    args.total_steps = args.total_steps or total
    args.checkpoints = sorted({int(s) for s in args.checkpoints.split(",")}) if args.checkpoints else checkpoints
    if args.checkpoints[-1] != args.total_steps:
        sys.exit(f"error: the last checkpoint must be --total-steps ({args.total_steps})")
    if args.backbone_weights is None:
        w = _common.SHARED_DATA.joinpath(*IMAGENET_RELU31)
        if not w.is_file():
            sys.exit(f"error: {w}: not found; pass --backbone-weights")
        args.backbone_weights = str(w)
    args.out = args.out or RESULTS / f"learning_curve-{args.preset}-{args.data}{'-quick' if args.quick else ''}.json"
    if args.bn_refresh:
        run_bn_refresh(args)
        return
    run_curve(args)


if __name__ == "__main__":
    main()
