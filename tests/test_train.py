"""Training: resume equivalence, outputs beside the model, and every bad input as a one-line user error."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file
from skimage.data import immunohistochemistry

from checks import fill_disk_at, one_line_error, sha256
from wsi_haloae.cli import main
from wsi_haloae.config import TrainConfig
from wsi_haloae.errors import BadInputError, BadTilesError, OutputError
from wsi_haloae.train import trainer


def write_tiles(folder: Path, n: int = 8, size: int = 256) -> Path:
    """n real IHC crops (skimage's immunohistochemistry image), some at another size to exercise resizing."""
    folder.mkdir(parents=True, exist_ok=True)
    im = immunohistochemistry()
    for i in range(n):
        y, x = (i // 4) * 200, (i % 4) * 80
        crop = im[y : y + size, x : x + size]
        Image.fromarray(crop).save(folder / f"t{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    folder = write_tiles(tmp_path_factory.mktemp("tiles") / "normal")
    # the manifest `wsi-haloae tiles` writes: the model records the training mpp from it
    (folder / "tiles.csv").write_text("slide,file,mpp\n" + "".join(f"s.svs,t{i}.png,0.5\n" for i in range(8)))
    return folder


def _cfg(tiles: Path, out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", epochs=2, samples_per_epoch=1, batch_size=1, backbone_weights="random", workers=0, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(tiles=tiles, out=out, **base)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def trained(tiles, tmp_path_factory) -> Path:
    """One uninterrupted tiny run (2 epochs of 1 step) shared by the tests below."""
    out = tmp_path_factory.mktemp("full") / "model.safetensors"
    assert trainer.run_train(_cfg(tiles, out)) == out
    return out


def test_resume_continues_to_the_same_weights(tiles, trained, tmp_path, monkeypatch):
    full = trained
    metrics_full = [json.loads(x) for x in full.with_name("model.metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics_full] == [0, 1]
    assert not full.with_name("model.resume.safetensors").exists()  # removed once the model is written

    # the same run, interrupted after its first epoch
    part = tmp_path / "part" / "model.safetensors"
    real = trainer._train_one_epoch

    def interrupt(*args, **kw):
        if args[4] == 1:  # epoch
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "_train_one_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_train(_cfg(tiles, part))
    monkeypatch.setattr(trainer, "_train_one_epoch", real)
    resume = part.with_name("model.resume.safetensors")
    assert resume.is_file() and not part.exists()
    after_first = {k[6:]: v for k, v in _tensors(resume).items() if k.startswith("model.")}

    # a different configuration may not continue it
    with pytest.raises(BadInputError, match="different configuration"):
        trainer.run_train(_cfg(tiles, part, resume=True, epochs=3))
    with pytest.raises(BadInputError, match="different configuration"):
        trainer.run_train(_cfg(tiles, part, resume=True, seed=4))

    # continuing it (with a worker process this time: samples do not depend on the worker count)
    trainer.run_train(_cfg(tiles, part, resume=True, workers=1))
    a, b = _tensors(full), _tensors(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=0), k
    # equality is not an artefact of nothing changing: the second epoch did move the trainable weights
    moved = [k for k, v in after_first.items() if "features" not in k and v.is_floating_point() and not torch.equal(v, a["model." + k])]
    assert len(moved) > 10
    metrics_part = [json.loads(x) for x in part.with_name("model.metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics_part] == [m["loss"] for m in metrics_full]


MID_EPOCH = dict(epochs=2, samples_per_epoch=3, checkpoint_minutes=0)


@pytest.fixture(scope="module")
def full_mid(tiles, tmp_path_factory) -> Path:
    """An uninterrupted run of 2 epochs of 3 steps, checkpointing after every step."""
    out = tmp_path_factory.mktemp("full-mid") / "model.safetensors"
    trainer.run_train(_cfg(tiles, out, **MID_EPOCH))
    return out


def _assert_same_run(a_path: Path, b_path: Path) -> None:
    a, b = _tensors(a_path), _tensors(b_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = lambda p: [json.loads(x) for x in p.with_name("model.metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(m["epoch"], m["step"], m["loss"], m["loss_fm"]) for m in lines(b_path)] == [
        (m["epoch"], m["step"], m["loss"], m["loss_fm"]) for m in lines(a_path)
    ]


def test_max_steps_keeps_the_resume_file_so_the_schedule_continues(tiles, trained, tmp_path):
    """A run stopped by max_steps before its schedule ends writes a usable model AND keeps its resume file;
    --resume then continues the same schedule to the uninterrupted run's weights (how the learning-curve
    benchmark scores a run at fixed steps without restarting it)."""
    part = tmp_path / "part" / "model.safetensors"
    trainer.run_train(_cfg(tiles, part, max_steps=1))
    resume = part.with_name("model.resume.safetensors")
    assert part.is_file() and resume.is_file()
    from wsi_haloae.model.checkpoint import read_header

    assert json.loads(read_header(part)["metadata"])["steps"] == 1
    trainer.run_train(_cfg(tiles, part, resume=True))
    assert not resume.exists()  # the schedule is complete: nothing left to continue
    a, b = _tensors(trained), _tensors(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_from_inside_an_epoch_is_bit_identical(tiles, full_mid, tmp_path, monkeypatch):
    """Timed checkpoints (here after every step) let a run stopped in the middle of an epoch continue to exactly
    the weights, BatchNorm statistics and metrics of an uninterrupted run."""
    part = tmp_path / "part" / "model.safetensors"
    real_write = trainer._write_resume
    written = []

    def write_then_stop(path, model, opt, info):
        real_write(path, model, opt, info)
        written.append(dict(info))
        if info["step"] == 2:  # epoch 0, after its second of three batches
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_write_resume", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.run_train(_cfg(tiles, part, **MID_EPOCH))
    monkeypatch.setattr(trainer, "_write_resume", real_write)
    assert [(w["epoch"], w["batch"], w["step"]) for w in written] == [(0, 1, 1), (0, 2, 2)]
    assert not part.exists()
    trainer.run_train(_cfg(tiles, part, resume=True, **MID_EPOCH))
    _assert_same_run(full_mid, part)


def test_sigterm_writes_a_resume_file_and_stops(tiles, full_mid, tmp_path, monkeypatch, caplog):
    """A scheduler's SIGTERM (SLURM at the time limit) stops the run at the next step boundary with a resume
    file, even when no timed checkpoint is due; --resume then ends where an uninterrupted run ends."""
    import os
    import signal

    part = tmp_path / "term" / "model.safetensors"
    real_loss = trainer.reconstruction_loss
    calls = []

    def loss_then_term(*args):
        calls.append(1)
        if len(calls) == 7:  # during step 4 (two reconstruction losses per step): epoch 1, batch 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    monkeypatch.setattr(trainer, "reconstruction_loss", loss_then_term)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        trainer.run_train(_cfg(tiles, part, **dict(MID_EPOCH, checkpoint_minutes=1e6)))
    monkeypatch.setattr(trainer, "reconstruction_loss", real_loss)
    assert "SIGTERM" in caplog.text and "step 4 of 6" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    _, meta = trainer._read_resume(part.with_name("model.resume.safetensors"))
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 4)
    trainer.run_train(_cfg(tiles, part, resume=True, **MID_EPOCH))
    _assert_same_run(full_mid, part)


def test_cpu_duration_estimate_and_warning(caplog):
    """The paper schedule on a CPU is announced with its duration and the ways out; a short tiny run is not."""
    from wsi_haloae.config import ModelConfig
    from wsi_haloae.train.estimate import train_step_flops, warn_if_long_on_cpu

    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="wsi_haloae.train.estimate"):
        low, high = warn_if_long_on_cpu(ModelConfig.preset("paper"), 4, 187_500, cpu)
    assert 30 * 86400 < low <= high  # months on any CPU: 187,500 steps of ~4.7 TFLOP
    (rec,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "187,500 steps" in rec.getMessage() and "--device cuda" in rec.getMessage() and "--preset tiny" in rec.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wsi_haloae.train.estimate"):
        warn_if_long_on_cpu(ModelConfig.preset("tiny"), 1, 10, cpu)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "estimated duration on this CPU" in caplog.text
    assert warn_if_long_on_cpu(ModelConfig.preset("tiny"), 1, 10, torch.device("meta")) is None  # not a CPU
    # a step of the paper preset: forward + backward of 12 images, ~395 GFLOP each (VGG 29 of them)
    assert 4.0e12 < train_step_flops(ModelConfig.preset("paper"), 4) < 5.5e12


def test_model_metadata(tiles, trained):
    from wsi_haloae.model import load_model
    from wsi_haloae.model.inputs import stack_tiles
    from wsi_haloae.train.data import load_tiles

    loaded = load_model(trained)
    md = loaded.metadata
    assert md["mpp"] == 0.5 and md["tile_count"] == 8 and md["epochs"] == 2 and md["steps"] == 2
    assert md["seed"] == 3 and md["preset"] == "tiny" and md["samples_per_epoch"] == 1 and md["batch_size"] == 1
    assert md["data"] == str(tiles.resolve()) and md["wall_time_s"] > 0
    assert loaded.model.backbone_info["source"] == "random"
    assert loaded.mean_map.shape == (64, 64) and torch.isfinite(loaded.mean_map).all() and loaded.mean_map.min() >= 0
    # the mean map is the training tiles' mean raw map, in eval mode
    ts = load_tiles(tiles, progress=False)
    with torch.no_grad():
        ref = loaded.model.anomaly_map(stack_tiles([ts.get(i) for i in range(len(ts))])).mean(0)
    assert torch.allclose(ref, loaded.mean_map, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad inputs
def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(BadTilesError, match="does not exist"):
        trainer.run_train(_cfg(tmp_path / "nope", tmp_path / "m.safetensors"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(BadTilesError, match="no image files"):
        trainer.run_train(_cfg(tmp_path / "empty", tmp_path / "m.safetensors"))


def test_no_readable_image(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not a png")
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 10)
    with pytest.raises(BadTilesError, match="none of the 2 image files could be read"):
        trainer.run_train(_cfg(bad, tmp_path / "m.safetensors"))


def test_unreadable_files_are_skipped_and_counted(tiles, tmp_path, caplog):
    from wsi_haloae.train.data import load_tiles

    mixed = write_tiles(tmp_path / "mixed", n=2)
    (mixed / "deep" / "er").mkdir(parents=True)
    Image.fromarray(immunohistochemistry()[:300, :200, 0]).save(mixed / "deep" / "er" / "gray.tif")  # grayscale, odd size
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (mixed / "notes.txt").write_text("ignored: not an image suffix")
    with caplog.at_level(logging.WARNING):
        ts = load_tiles(mixed, progress=False)
    assert len(ts) == 3 and ts.skipped == 1
    assert "skipped 1 unreadable" in caplog.text
    gray = ts.get([p.name for p in ts.paths].index("gray.tif"))
    assert gray.shape == (256, 256, 3) and gray.dtype == np.uint8
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_mvtec_category_uses_train_good(tmp_path):
    from wsi_haloae.train.data import load_tiles

    cat = tmp_path / "bottle"
    write_tiles(cat / "train" / "good", n=3)
    write_tiles(cat / "test" / "broken", n=2)
    ts = load_tiles(cat, progress=False)
    assert len(ts) == 3 and ts.root == cat / "train" / "good"


def test_resume_without_a_resume_file(tiles, tmp_path):
    with pytest.raises(BadInputError, match="no resume file"):
        trainer.run_train(_cfg(tiles, tmp_path / "m.safetensors", resume=True))


def test_bad_device_and_output(tiles, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="no CUDA device"):
            trainer.run_train(_cfg(tiles, tmp_path / "m.safetensors", device="cuda"))
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        trainer.run_train(_cfg(tiles, tmp_path / "adir"))


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    runner = CliRunner()
    for args in (
        ["train", "--tiles", str(tmp_path / "missing"), "--out", str(tmp_path / "m.safetensors")],
        ["train", "--tiles", str(tmp_path), "--out", str(tmp_path / "m.safetensors"), "--preset", "tiny"],
    ):
        r = runner.invoke(main, args)
        assert r.exit_code == 2, r.output
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_passes_checkpoint_minutes_and_compile(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(trainer, "run_train", lambda cfg: seen.append(cfg))
    r = CliRunner().invoke(main, ["train", "--tiles", str(tmp_path), "--out", str(tmp_path / "m.safetensors"),
                                  "--checkpoint-minutes", "2.5", "--compile"])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert cfg.checkpoint_minutes == 2.5 and cfg.compile is True and cfg.refresh_bn is True
    r = CliRunner().invoke(main, ["train", "--tiles", str(tmp_path), "--out", str(tmp_path / "m.safetensors")])
    assert seen[-1].checkpoint_minutes == 10.0 and seen[-1].compile is False
    r = CliRunner().invoke(main, ["train", "--tiles", str(tmp_path), "--out", str(tmp_path / "m.safetensors"), "--no-refresh-bn"])
    assert r.exit_code == 0 and seen[-1].refresh_bn is False
    r = CliRunner().invoke(main, ["train", "--tiles", str(tmp_path), "--out", str(tmp_path / "m"), "--checkpoint-minutes", "-1"])
    assert r.exit_code == 2 and "checkpoint-minutes" in r.output


def test_dataset_samples_are_a_function_of_seed_epoch_index(tiles):
    from wsi_haloae.train.data import CutPasteDataset, load_tiles

    ts = load_tiles(tiles, progress=False)
    ds = CutPasteDataset(ts, n_samples=6, seed=1)
    a = ds[(2, 4)]
    ds[(0, 1)], ds[(5, 0)]
    b = CutPasteDataset(ts, n_samples=6, seed=1)[(2, 4)]
    c = ds[(3, 4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # pasted versions differ from their original only where something was pasted (tested in detail elsewhere)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])


# -- outputs: never over an input, one run at a time, a full disk keeps the last epoch (issue 13) ------------
def _cli_train(tiles: Path, out: Path, *extra: str):
    args = ["train", "--tiles", str(tiles), "--out", str(out), "--preset", "tiny", "--epochs", "2",
            "--samples-per-epoch", "1", "--batch-size", "1", "--backbone-weights", "random", "--workers", "0",
            "--device", "cpu", "--seed", "3", *extra]
    return CliRunner().invoke(main, args)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".part", ".lock")) or ".probe-" in p.name)


def test_out_may_not_be_an_input_or_a_foreign_file(tiles, tmp_path, synthetic_slide):
    slide = tmp_path / "slide.tif"
    slide.write_bytes(synthetic_slide.read_bytes())
    (tmp_path / "link.safetensors").symlink_to(slide)
    cases = {
        slide: "exists and is not a wsi-haloae model file",  # the data loss of issue 13: a slide overwritten
        tmp_path / "link.safetensors": "exists and is not a wsi-haloae model file",
        tiles / "t0.png": "lies inside the tile folder",
        tiles / "model.safetensors": "lies inside the tile folder",
    }
    before = {p: sha256(p) for p in [slide, *tiles.iterdir()]}
    for out, why in cases.items():
        one_line_error(_cli_train(tiles, out), why)
    weights = tmp_path / "vgg.safetensors"
    weights.write_bytes(b"weights")
    one_line_error(CliRunner().invoke(main, ["train", "--tiles", str(tiles), "--out", str(weights),
                                              "--backbone-weights", str(weights)]), "would overwrite the backbone weights")
    assert {p: sha256(p) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "slide.tif", "vgg.safetensors"]


def test_a_second_run_on_the_model_is_refused(tiles, tmp_path):
    from wsi_haloae.fileio import output_lock

    out = tmp_path / "model.safetensors"
    with output_lock(out, "model file"):  # what a run in another process holds
        res = _cli_train(tiles, out)
    one_line_error(res, "another wsi-haloae run is writing this model file")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("target, nth, epochs, named", [
    ("model.resume.safetensors", 2, 2, "model.resume.safetensors: cannot write the resume file"),  # epoch 2's
    ("model.metrics.jsonl", 3, 2, "model.metrics.jsonl: cannot write the metrics file"),  # afresh, epoch 1, epoch 2
    (f"model.safetensors.{os.getpid()}.part", 1, 1, "model.safetensors: cannot write the model file"),
], ids=["resume", "metrics", "model"])
def test_full_disk_keeps_the_last_complete_epoch(tiles, tmp_path, monkeypatch, target, nth, epochs, named):
    out = tmp_path / "model.safetensors"
    resume = tmp_path / "model.resume.safetensors"
    tiles_before = {p: sha256(p) for p in tiles.iterdir()}
    hits = fill_disk_at(monkeypatch, target, nth)
    res = _cli_train(tiles, out, "--epochs", str(epochs))
    err = one_line_error(res, "(No space left on device)", f"{resume} (the last checkpoint) is kept")
    assert hits["hits"] == nth and err.startswith(f"error: {tmp_path / named}")
    assert not out.exists() and _leftovers(tmp_path) == []
    with safe_open_meta(resume) as meta:
        assert meta["epoch"] == 1  # the last epoch that completed before the disk filled
    metrics = [json.loads(x) for x in (tmp_path / "model.metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(len(metrics)))  # whole lines only
    assert {p: sha256(p) for p in tiles.iterdir()} == tiles_before
    if target == "model.metrics.jsonl":
        return  # continuing is the same as after the resume-file failure
    monkeypatch.undo()
    res = _cli_train(tiles, out, "--epochs", str(epochs), "--resume")  # space freed: no finished epoch lost
    assert res.exit_code == 0, res.output
    assert load_file(str(out)) and not resume.exists() and _leftovers(tmp_path) == []


class safe_open_meta:
    """The JSON ``resume`` metadata of a resume file."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            self.meta = json.loads(fh.metadata()["resume"])

    def __enter__(self):
        return self.meta

    def __exit__(self, *exc):
        return False


def test_saved_model_has_the_users_permissions(tmp_path):
    """Model files get the user's umask (they were 0600 whatever the umask)."""
    from wsi_haloae.model import build_model, save_model

    model = build_model("tiny", "random")
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "model.safetensors", model, torch.zeros(64, 64))
        os.umask(0o077)
        save_model(tmp_path / "private.safetensors", model, torch.zeros(64, 64))
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.safetensors").stat().st_mode & 0o777 == 0o600
