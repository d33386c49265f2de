"""The ``info`` command: a model's shape, parameter counts and cost per tile, on stdout.

FLOPs are counted by ``torch.utils.flop_counter`` on the meta device: no weights are loaded and nothing is
computed, so ``info`` is instant even for the paper preset and needs no backbone weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from .haloae import HaloAE


def count_flops(cfg: ModelConfig, batch: int = 1) -> dict[str, int]:
    """FLOPs of the inference path (``anomaly_map``) for ``batch`` tiles: backbone and auto-encoder apart."""
    with torch.device("meta"):
        model = HaloAE(cfg).eval()
    x = torch.empty(batch, 3, cfg.tile_size, cfg.tile_size, device="meta")
    with FlopCounterMode(display=False) as fc:
        fm = model.extract(x)
    backbone = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        model.autoencoder(fm)
    ae = fc.get_total_flops()
    return {"backbone": backbone // batch, "autoencoder": ae // batch, "total": (backbone + ae) // batch}


def describe(cfg: ModelConfig) -> dict:
    """Everything ``info`` prints, as a JSON-able dict (also used by benchmarks)."""
    with torch.device("meta"):
        model = HaloAE(cfg)
    counts = model.parameter_breakdown()
    inner = cfg.fm_size - cfg.head_kernel + 1
    return {
        "preset": cfg.name,
        "description": cfg.description,
        "taps": list(cfg.taps),
        "vgg_layers": cfg.deepest_layer + 1,
        "fm_channels": cfg.fm_channels,
        "fm_size": cfg.fm_size,
        "bottleneck": [cfg.encoder[-1].width, inner, inner],
        "attention": cfg.attention,
        "parameters": counts,
        "flops_per_tile": count_flops(cfg),
    }


def _stain_line(d: dict) -> str:
    ref = d.get("reference")
    if ref is None:
        return f"{d['method']} (no reference: a colour QC compares slides with the default H&E stain)"
    return f"{d['method']} (reference from {ref['tiles_used']} of {ref['tiles']} training tiles; docs/stain.md)"


def _fmt(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def run_info(preset: str = "paper", model_path: Path | None = None) -> dict:
    """Print a preset's (or a model file's) description on stdout; returns it as a dict."""
    file_lines: list[str] = []
    if model_path is not None:
        from .checkpoint import load_model

        from ..scoring.calibration import Calibration

        loaded = load_model(model_path)
        cfg = loaded.model.config
        bb = loaded.model.backbone_info
        meta = {k: v for k, v in loaded.metadata.items() if k != "calibration"}  # thousands of scores: summarised
        cal = Calibration.from_metadata(loaded.metadata, f"model file {model_path}")
        file_lines = [
            f"model file:        {model_path}",
            f"sha256:            {loaded.sha256}",
            f"backbone:          {bb.get('source')} (tensors sha256 {str(bb.get('sha256'))[:16]}…"
            + (f", from {bb['path']}" if bb.get("path") else "")
            + ")",
            f"stain:             {_stain_line(loaded.model.stain.describe())}",
            f"metadata:          {json.dumps(meta, sort_keys=True)}",
            (cal.line() if cal is not None else "calibration: none (no p-values or calibrated calls; see docs/scores.md)")
            .replace("calibration: ", f"{'calibration:':19s}", 1),
        ]
    else:
        cfg = ModelConfig.preset(preset)
    d = describe(cfg)
    p, f = d["parameters"], d["flops_per_tile"]
    lines = [
        f"preset:            {d['preset']}" + (f"  ({d['description']})" if d["description"] else ""),
        *file_lines,
        f"taps:              {', '.join(d['taps'])}  (frozen VGG19 features[:{d['vgg_layers']}], {_fmt(p['frozen_backbone'])} parameters, not counted below)",
        f"fm channels:       {d['fm_channels']} x {d['fm_size']} x {d['fm_size']}",
        f"bottleneck:        {' x '.join(map(str, d['bottleneck']))}",
        f"attention:         {d['attention']}"
        + ("  (the authors' inverted mask: windowed average pooling of v, not attention)" if d["attention"] == "authors-mask" else ""),
        f"trainable params:  {_fmt(p['total_trainable'])}",
        f"  auto-encoder:    {_fmt(p['autoencoder'])}  (inference path)",
        f"  image decoder:   {_fmt(p['image_reconstructor'])}  (training only)",
        f"  classifier:      {_fmt(p['classifier'])}  (training only)",
        f"FLOPs/tile:        {f['total'] / 1e9:.1f} GFLOP for anomaly_map on {cfg.tile_size}x{cfg.tile_size}"
        f"  (VGG19 {f['backbone'] / 1e9:.1f} + auto-encoder {f['autoencoder'] / 1e9:.1f}; torch.utils.flop_counter)",
    ]
    print("\n".join(lines))  # a results command: its description is the result, on stdout
    return d
