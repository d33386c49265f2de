"""Issue 13: never lose an input, never leave a broken result that looks complete.

One test (or group) per case of the issue, each first shown failing on the code before the fix (see the
issue note): 1 outputs that overwrite inputs, 2 two runs on one output, 3 a full disk at any write,
5 a model whose maps are NaN, 6 unwritable paths and usage errors as one line, 8 an oversized batch.
Each checks: exit 2 (or the UserError), one line, inputs byte-identical, nothing complete-looking left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import checks
from checks import one_line_error, sha256
from test_infer import cfg_for, probe, with_
from wsi_haloae.cli import main
from wsi_haloae.errors import BadModelFileError, OutputError
from wsi_haloae.fileio import lock_name, partial_name
from wsi_haloae.infer import batch, writers
from wsi_haloae.infer.engine import run_infer

TESTS = Path(__file__).resolve().parent


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Everything in ``folder`` but ``keep``: temp files, locks, half outputs."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from wsi_haloae.model import build_model, save_model

    model = build_model("tiny", backbone_weights="random")
    return save_model(tmp_path_factory.mktemp("model") / "tiny.safetensors", model, torch.zeros(64, 64), {"mpp": 0.5})


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "small.tif", width=1024, height=1024, mpp=0.5)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------- 1: outputs vs inputs
def test_1_no_output_may_overwrite_or_hide_an_input(small_slide, tiny_model, tmp_path):
    slide = tmp_path / "S.tif"
    slide.write_bytes(small_slide.read_bytes())
    model = tmp_path / "M.safetensors"
    model.write_bytes(tiny_model.read_bytes())
    hard = tmp_path / "hard.tif"
    os.link(slide, hard)
    link = tmp_path / "link.tif"
    link.symlink_to(slide)
    before = {p: sha256(p) for p in (slide, model)}
    base = ["infer", slide, "--model", model, "--device", "cpu", "--workers", "0"]
    cases = [
        (["--out", tmp_path / "x.zarr", "--tiff", slide], "--tiff would overwrite the slide"),
        (["--out", tmp_path / "x.zarr", "--geojson", model], "--geojson would overwrite the --model"),
        (["--out", tmp_path / "x.zarr", "--preview", hard], "--preview would overwrite the slide"),
        (["--out", tmp_path / "x.zarr", "--preview", link], "--preview would overwrite the slide"),
        (["--out", tmp_path], "would replace a folder that holds the slide"),
        (["--out", slide], "--out would overwrite the slide"),
    ]
    # the colour copy of --tiff is an output too: --tiff X.tif writes X.rgb.tif, which may be the slide
    rgb_slide = tmp_path / "Y.rgb.tif"
    os.link(slide, rgb_slide)
    cases.append((["--out", tmp_path / "x.zarr", "--tiff", tmp_path / "Y.tif"],
                  "the colour OME-TIFF of --tiff would overwrite the slide"))
    for extra, msg in cases:
        one_line_error(cli(*base, *extra), msg)  # also: nothing on stdout
    assert {p: sha256(p) for p in (slide, model)} == before
    assert not (tmp_path / "x.zarr").exists()
    assert leftovers(tmp_path, {"S.tif", "M.safetensors", "hard.tif", "link.tif", "Y.rgb.tif"}) == []


def test_1_cohort_refuses_outputs_that_are_its_slides(small_slide, tiny_model, tmp_path):
    """A slide named A.ome.tiff in the output folder is the OME-TIFF cohort would write for slide A."""
    d = tmp_path / "run"
    d.mkdir()
    victim = d / "A.ome.tiff"
    victim.write_bytes(small_slide.read_bytes())
    manifest = d / "cohort.csv"  # the manifest is where the cohort table would go
    before = sha256(victim)
    one_line_error(cli("cohort", str(d / "*.tiff"), "--model", tiny_model, "--out", d, "--device", "cpu"),
                   "the OME-TIFF of slide A would overwrite the slide A")
    manifest.write_text(f"slide\n{small_slide}\n")
    one_line_error(cli("cohort", manifest, "--model", tiny_model, "--out", d, "--device", "cpu", "--dry-run"),
                   "cohort cohort.csv would overwrite the manifest")
    assert sha256(victim) == before and sorted(p.name for p in d.iterdir()) == ["A.ome.tiff", "cohort.csv"]


# ------------------------------------------------------------------------------ 2: one writer per output
def _cli_cmd(slide: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "wsi_haloae.cli", "infer", str(slide), "--model", str(model), "--out", str(out),
            "--device", "cpu", "--workers", "0", "--batch-size", "1", "--pixel-downsample", "1", *extra]


def test_2_a_second_run_on_the_same_output_is_refused_and_the_first_is_whole(small_slide, tiny_model, tmp_path):
    """Two real processes on one --out. The first is paused as soon as it holds its lock, so the second
    surely starts while the first is writing; it must be refused in one line without touching anything."""
    out = tmp_path / "o.zarr"
    ref = run_infer(cfg_for(small_slide, tmp_path / "ref", model=tiny_model, batch_size=1, pixel_downsample=1))
    first = subprocess.Popen(_cli_cmd(small_slide, tiny_model, out, "--geojson", str(tmp_path / "t.geojson")),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not lock_name(out).exists():
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(_cli_cmd(small_slide, tiny_model, out, "--geojson", str(tmp_path / "t2.geojson")),
                                capture_output=True, text=True, timeout=300)
        first.send_signal(signal.SIGCONT)
        _, err1 = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "another wsi-haloae run is writing" in lines[0]
    assert first.returncode == 0, err1[-2000:]
    assert writers.is_complete(out) and not (tmp_path / "t2.geojson").exists()
    a, b = writers.open_store(out), writers.open_store(ref.out)
    for x, y in zip(writers.map_levels(a), writers.map_levels(b)):  # the first run's map is whole
        np.testing.assert_allclose(x[:], y[:], rtol=1e-4, atol=1e-6, equal_nan=True)
    assert leftovers(tmp_path, {"o.zarr", "t.geojson", "ref"}) == []


# --------------------------------------------------------------------------- 3: a full disk at any write
STAGES = [  # (where the disk fills, which output the one-line error names)
    ("partial.zarr/0/0/0", "o.zarr: cannot write zarr store"),  # a level-0 chunk, in the writer thread
    ("partial.zarr/tiles/", "o.zarr: cannot write zarr store"),  # the tile tables
    ("partial.zarr/mask/0/", "o.zarr: cannot write zarr store"),
    ("partial.zarr/1/0/", "o.zarr: cannot write zarr store"),  # build_pyramid
    (".h.ome.tif.partial", "h.ome.tif: cannot write OME-TIFF"),
    (".h.rgb.ome.tif.partial", "h.rgb.ome.tif: cannot write colour OME-TIFF"),
    (".t.geojson.gz.partial", "t.geojson.gz: cannot write GeoJSON"),
    (".p.png.partial", "p.png: cannot write preview"),
    ("partial.zarr/.complete", "o.zarr: cannot write zarr store"),  # the completion marker itself
]


def _all_outputs(slide: Path, d: Path):
    return cfg_for(slide, d, tiff=d / "h.ome.tif", geojson=d / "t.geojson.gz", preview=d / "p.png")


@pytest.mark.parametrize("where,message", STAGES, ids=[s[0].strip("./").split("/")[-2 if s[0].endswith("/") else -1] or s[0]
                                                       for s in STAGES])
def test_3_a_full_disk_anywhere_leaves_no_output_and_one_line(synthetic_slide, tmp_path, where, message):
    before = sha256(synthetic_slide)
    cfg = _all_outputs(synthetic_slide, tmp_path)
    disk = checks.full_disk_at(where)
    try:
        with pytest.raises(OutputError) as ei:
            run_infer(cfg, loaded=probe())
    finally:
        checks.restore()
    assert disk.hits, f"the disk never filled at {where}"
    msg = str(ei.value)
    assert "\n" not in msg and message in msg and msg.endswith("(No space left on device)"), msg
    assert leftovers(tmp_path, set()) == []  # no output, no temp, no lock
    assert sha256(synthetic_slide) == before


def test_3_attributes_too(synthetic_slide, tmp_path):
    """The provenance attributes are the largest metadata write: let the small ones pass, fail that one."""
    cfg = _all_outputs(synthetic_slide, tmp_path)
    disk = checks.full_disk(lambda p: p.split("/")[-1].startswith(".zattrs") and "partial.zarr/.zattrs" in p,
                            room=3000)
    try:
        with pytest.raises(OutputError, match=r"o\.zarr: cannot write zarr store \(No space left on device\)"):
            run_infer(cfg, loaded=probe())
    finally:
        checks.restore()
    assert disk.hits and leftovers(tmp_path, set()) == []


def test_3_a_failed_overwrite_keeps_the_previous_outputs(synthetic_slide, tmp_path):
    cfg = _all_outputs(synthetic_slide, tmp_path)
    run_infer(cfg, loaded=probe())
    names = ["o.zarr", "h.ome.tif", "h.rgb.ome.tif", "t.geojson.gz", "p.png"]
    before = {n: sha256(tmp_path / n) for n in names[1:]}
    stamp = writers.read_attrs(cfg.out)["end_time"]
    checks.full_disk_at(".p.png.partial")
    try:
        with pytest.raises(OutputError, match="No space left on device"):
            run_infer(with_(cfg, overwrite=True), loaded=probe())
    finally:
        checks.restore()
    assert leftovers(tmp_path, set(names)) == []
    assert {n: sha256(tmp_path / n) for n in names[1:]} == before
    assert writers.is_complete(cfg.out) and writers.read_attrs(cfg.out)["end_time"] == stamp
    # a missing extra made later from the complete store fails alike, leaving the store as it was
    (tmp_path / "p.png").unlink()
    checks.full_disk_at(".p.png.partial")
    try:
        with pytest.raises(OutputError, match=r"p\.png: cannot write preview \(No space left on device\)"):
            run_infer(cfg, loaded=probe())
    finally:
        checks.restore()
    assert leftovers(tmp_path, set(names) - {"p.png"}) == []


def test_3_the_command_says_it_in_one_line_and_exits_2(small_slide, tiny_model, tmp_path):
    out = tmp_path / "o.zarr"
    code = ("import sys; sys.path.insert(0, %r); import checks; checks.full_disk_at('partial.zarr/0/0/0'); "
            "from wsi_haloae.cli import main; main()" % str(TESTS))
    p = subprocess.run([sys.executable, "-c", code, *_cli_cmd(small_slide, tiny_model, out)[3:],
                        "--tiff", str(tmp_path / "h.ome.tif")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: {out}: cannot write zarr store (No space left on device)"], p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == errors[0]  # the last word, after the progress bar
    assert leftovers(tmp_path, set()) == []


def test_3_a_real_small_file_system_when_allowed(small_slide, tiny_model, tmp_path):
    """The same on a real full disk: a 2 MB tmpfs in a user+mount namespace (skips where not permitted)."""
    import shutil

    if not shutil.which("unshare"):
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe_ns = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m none {mnt}"],
                              capture_output=True, text=True)
    if probe_ns.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {probe_ns.stderr.strip()[:200]}")
    cmd = " ".join(_cli_cmd(small_slide, tiny_model, mnt / "o.zarr", "--tiff", str(mnt / "h.ome.tif"),
                            "--preview", str(mnt / "p.png"))[:-4])  # default --pixel-downsample: a 1 MB map
    filler = f"head -c 1900000 /dev/zero > {mnt}/filler"
    p = subprocess.run(["unshare", "-rm", "sh", "-c",
                        f"mount -t tmpfs -o size=2m none {mnt} && {filler} && {cmd}; echo rc=$?; "
                        f"rm {mnt}/filler; ls -A {mnt}"], capture_output=True, text=True, timeout=600)
    out = p.stdout.split()
    assert "rc=2" in out, p.stdout + p.stderr[-2000:]
    assert out[out.index("rc=2") + 1:] == []  # nothing left on the small disk
    assert p.stderr.strip().splitlines()[-1].endswith("(No space left on device)"), p.stderr[-2000:]


# ----------------------------------------------------------------------------------- 5: NaN model maps
def test_5_a_model_that_outputs_nan_is_refused_at_the_first_batch(small_slide, tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_model), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = {k: torch.full_like(v, float("nan")) if v.is_floating_point() and "autoencoder" in k else v
           for k, v in tensors.items()}
    nan_model = tmp_path / "nan.safetensors"
    save_file(bad, str(nan_model), metadata=meta)
    before = sha256(nan_model)
    out = tmp_path / "o.zarr"
    p = subprocess.run(_cli_cmd(small_slide, nan_model, out, "--geojson", str(tmp_path / "t.geojson")),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "NaN or infinite" in last and "nan.safetensors" in last
    assert "Traceback" not in p.stderr
    assert sha256(nan_model) == before and leftovers(tmp_path, {"nan.safetensors"}) == []

    # in-process: the first batch is where it stops (no tile after it is read)
    class NaNProbe(type(probe().model)):
        calls = 0

        def anomaly_map(self, x):
            NaNProbe.calls += x.device.type != "meta"  # the memory probe's shapes-only call does not count
            return torch.full((x.shape[0], 64, 64), float("inf"), device=x.device)

    loaded = probe()
    loaded.model = NaNProbe()
    with pytest.raises(BadModelFileError, match="NaN or infinite"):
        run_infer(cfg_for(small_slide, tmp_path, batch_size=1), loaded=loaded)
    assert NaNProbe.calls == 1  # it stopped at the first batch


# ------------------------------------------------------------------------- 6: one line for every error
def test_6_unwritable_places_are_one_line(small_slide, tiny_model, tmp_path):
    for extra in (["--out", "/proc/x.zarr"], ["--out", tmp_path / "o.zarr", "--preview", "/proc/p.png"],
                  ["--out", tmp_path / "o.zarr", "--tiff", "/proc/self/h.ome.tif"]):
        assert one_line_error(cli("infer", small_slide, "--model", tiny_model, "--device", "cpu", *extra)).startswith(
            "error: /proc/")
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("args", [
    ["infer", "s.svs", "--out", "a.zarr"],  # missing --model
    ["infer", "s.svs", "--model", "m", "--out", "a.zarr", "--device", "gpu"],  # bad choice
    ["cohort"],  # missing argument
    ["cohort", "x", "--model", "m", "--out", "o", "--jobs", "0"],  # out of range
    ["train", "--tiles", "t"],
    ["tiles", "s.svs", "--out", "t", "--min-tissue", "3"],
    ["evaluate", "--model", "m"],
    ["info", "--bogus"],
    ["demo", "--device", "tpu"],
    ["nosuchcommand"],
])
def test_6_usage_errors_are_one_line_for_every_command(args):
    res = cli(*args)
    one_line_error(res, "--help")
    assert res.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------- 8: the batch size
def test_8_an_oversized_batch_is_reduced_to_what_fits_with_a_warning(synthetic_slide, tmp_path, monkeypatch, caplog):
    ref = run_infer(cfg_for(synthetic_slide, tmp_path / "ref", batch_size=4), loaded=probe())
    # pretend 8 MB are free: the probe model's scoring takes ~1 MB a tile, plus the tiles in flight
    monkeypatch.setattr(batch, "available_host_bytes", lambda: 8 * 2**20)
    cfg = cfg_for(synthetic_slide, tmp_path, batch_size=100000)
    with caplog.at_level("WARNING", logger="wsi_haloae.infer.batch"):
        result = run_infer(cfg, loaded=probe())
    warning = [r.getMessage() for r in caplog.records if "--batch-size 100000" in r.getMessage()]
    assert len(warning) == 1 and "does not fit in memory" in warning[0]
    used = writers.read_attrs(cfg.out)["batch_size"]
    assert 1 <= used < result.tiles_tissue and writers.read_attrs(cfg.out)["batch_size_requested"] == 100000
    np.testing.assert_allclose(writers.open_store(cfg.out)["tiles/score_mean"][:],
                               writers.open_store(ref.out)["tiles/score_mean"][:], rtol=1e-5)


def test_8_batch_rule():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    mb = 2**20
    assert batch.fit_batch_size(32, 1000, cpu, 30 * mb, 1 * mb, None, None) == 32  # nothing known: as asked
    assert batch.fit_batch_size(100000, 152, cpu, 30 * mb, 1 * mb, 100_000 * mb, None) == 152  # the slide's tiles
    assert batch.fit_batch_size(1000, 5000, cpu, 30 * mb, 2 * mb, 6400 * mb, None) == 100  # half of 6.4 GB / 32 MB
    assert batch.fit_batch_size(1000, 5000, gpu, 100 * mb, 1 * mb, 10**6 * mb, 1000 * mb) == 8  # 80 % of the GPU
    assert batch.fit_batch_size(64, 5000, cpu, 10**4 * mb, 1 * mb, 100 * mb, None) == 1  # never 0


def test_8_the_measured_tile_memory_follows_the_preset():
    """The probe's figure for the real tiny model, against its activation sizes (the VGG taps at 256² and
    the decoder output at 64² are live at once): a few tens of MB, not kB or GB."""
    from wsi_haloae.model import build_model

    model = build_model("tiny", backbone_weights="random").eval()
    per_tile = batch.bytes_per_tile(lambda m, mm: lambda x: m.anomaly_map(x.float()), model, torch.zeros(64, 64),
                                    torch.device("cpu"))
    relu1 = 64 * 256 * 256 * 4  # one float32 64-channel 256x256 activation
    assert 2 * relu1 < per_tile < 20 * relu1


def test_8_infers_own_scorer_runs_on_the_meta_device(caplog):
    """infer's memory probe runs its real scorer (model.anomaly_map.score_batch) on a meta copy of the model;
    a scorer that cannot (e.g. autocast asked for device "meta") would fall back to scoring a real tile."""
    import logging

    from wsi_haloae.infer.engine import _scorer
    from wsi_haloae.model import build_model

    model = build_model("tiny", backbone_weights="random").eval()
    with caplog.at_level(logging.DEBUG, logger="wsi_haloae.infer.batch"):
        per_tile = batch.bytes_per_tile(lambda m, mm: _scorer(m, mm, 64), model, torch.zeros(64, 64), torch.device("cpu"))
    assert not [r for r in caplog.records if "probe failed" in r.getMessage()]
    assert per_tile > 2 * 64 * 256 * 256 * 4
