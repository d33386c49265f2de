"""`wsi-haloae tiles`: files, manifest, thumbnail, re-runs, interruption, workers, sampling, and bad slides."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from checks import fill_disk_at, one_line_error, sha256
from conftest import shared_path
from wsi_haloae.cli import main
from wsi_haloae.config import TilesConfig
from wsi_haloae.slide import tiles as tiles_mod
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.slide.tiles import run_tiles


def _cli(*args):
    return CliRunner().invoke(main, ["tiles", *map(str, args)])


def _images(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*") if p.suffix in (".png", ".jpg"))


def _manifest(out: Path) -> list[dict]:
    with (out / "tiles.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiles_writes_images_manifest_thumbnail(synthetic_slide, tmp_path):
    out = tmp_path / "out"
    res = _cli(synthetic_slide, "--out", out, "--mpp", "0.5")
    assert res.exit_code == 0, res.output
    rows = _manifest(out)
    names = _images(out)
    assert names == sorted(r["file"] for r in rows) and len(names) >= 8
    r0 = SlideReader(synthetic_slide)
    for row in rows[:3]:
        x, y = int(row["x"]), int(row["y"])
        assert row["file"] == f"synthetic_{x}_{y}.png" and x % 256 == 0 and y % 256 == 0
        assert float(row["mpp"]) == 0.5 and float(row["level0_size"]) == 256 and float(row["tissue"]) >= 0.5
        np.testing.assert_array_equal(np.asarray(Image.open(out / row["file"])), r0.read_tile(x, y, 256, 0.5))
    assert Path(rows[0]["slide"]) == synthetic_slide.resolve()
    thumb = Image.open(out / "thumbnails" / "synthetic.png")
    assert thumb.mode == "RGB" and max(thumb.size) >= 500
    summary = res.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"tiles: {len(rows)} kept / 64 grid tiles") and " s in all" in summary


def test_rerun_skips_and_jpg_and_stale_parts(synthetic_slide, tmp_path):
    out = tmp_path / "out"
    cfg = TilesConfig(slide=synthetic_slide, out=out, mpp=1.0, format="jpg")
    s1 = run_tiles(cfg, progress=False)
    assert s1.written == s1.kept > 0 and s1.skipped == 0
    first = _images(out)
    assert all(n.endswith(".jpg") for n in first)
    mtimes = {n: (out / n).stat().st_mtime_ns for n in first}
    stale = out / f".{first[0]}.12345.part"  # what a killed run leaves behind
    stale.write_bytes(b"half")
    (out / first[1]).unlink()
    s2 = run_tiles(cfg, progress=False)
    assert (s2.written, s2.skipped) == (1, s1.kept - 1)
    assert not stale.exists()
    assert {n: (out / n).stat().st_mtime_ns for n in first if n != first[1]} == {k: v for k, v in mtimes.items() if k != first[1]}
    assert len(_manifest(out)) == s1.kept  # the slide's rows replaced, not appended


def test_interrupted_write_leaves_no_half_image(synthetic_slide, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self, fp, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # write part of the file, then the user presses Ctrl-C
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        run_tiles(TilesConfig(slide=synthetic_slide, out=out, mpp=0.5), progress=False)
    names = _images(out)
    assert len(names) == 2
    for n in names:  # every file under a final name decodes completely
        Image.open(out / n).load()
    assert not list(out.glob(".*.part")) and not (out / "tiles.csv").exists()
    monkeypatch.setattr(Image.Image, "save", real_save)
    s = run_tiles(TilesConfig(slide=synthetic_slide, out=out, mpp=0.5), progress=False)
    assert s.skipped == 2 and s.written == s.kept - 2


def test_workers_give_the_same_files(synthetic_slide, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_tiles(TilesConfig(slide=synthetic_slide, out=a, mpp=0.5, workers=1), progress=False)
    s = run_tiles(TilesConfig(slide=synthetic_slide, out=b, mpp=0.5, workers=2), progress=False)
    assert s.written > tiles_mod.CHUNK  # more than one chunk, so the pool really ran
    assert _images(a) == _images(b)
    for n in _images(a):
        assert (a / n).read_bytes() == (b / n).read_bytes()


def test_max_tiles_is_a_seeded_sample(synthetic_slide, tmp_path):
    full = run_tiles(TilesConfig(slide=synthetic_slide, out=tmp_path / "full", mpp=0.5), progress=False)
    s1 = run_tiles(TilesConfig(slide=synthetic_slide, out=tmp_path / "s1", mpp=0.5, max_tiles=5), progress=False)
    s2 = run_tiles(TilesConfig(slide=synthetic_slide, out=tmp_path / "s2", mpp=0.5, max_tiles=5), progress=False)
    s3 = run_tiles(TilesConfig(slide=synthetic_slide, out=tmp_path / "s3", mpp=0.5, max_tiles=5, seed=7), progress=False)
    assert s1.kept == 5 and full.kept > 5
    assert _images(tmp_path / "s1") == _images(tmp_path / "s2")
    assert set(_images(tmp_path / "s1")) <= set(_images(tmp_path / "full"))
    assert _images(tmp_path / "s3") != _images(tmp_path / "s1")


def test_bad_options_and_output(synthetic_slide, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    res = _cli(synthetic_slide, "--out", f)
    assert res.exit_code == 2 and "exists and is not a folder" in res.stderr
    res = _cli(synthetic_slide, "--out", tmp_path / "o", "--class", "Tumor")
    assert res.exit_code == 2 and "--class needs --annotations" in res.stderr


# -- real slides ---------------------------------------------------------------------------------------------

BROKEN = [
    ("histolab-fixtures", "tests", "fixtures", "svs-images", "broken.svs"),
    ("openslide-python-fixtures", "tests", "fixtures", "unreadable.svs"),
    ("openslide-python-fixtures", "tests", "fixtures", "unopenable.tiff"),
]


@pytest.mark.shared
@pytest.mark.parametrize("parts", BROKEN, ids=lambda p: p[-1])
def test_broken_slidesone_line_error(parts, tmp_path):
    p = shared_path(*parts)
    out = tmp_path / "out"
    res = _cli(p, "--out", out, "--mpp", "0.5")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(p) in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() or (not _images(out) and not (out / "tiles.csv").exists())


@pytest.mark.shared
def test_tcga_without_mpp_refused_then_works_with_slide_mpp(tmp_path):
    p = shared_path("histolab-fixtures", "tests", "fixtures", "svs-images", "tcga-cr-7395-01a-01-ts1.svs")
    out = tmp_path / "out"
    for args in ((), ("--mpp", "1.0"), ("--magnification", "10x")):  # a target alone does not say what level 0 is
        res = _cli(p, "--out", out, *args)
        assert res.exit_code == 2 and "--slide-mpp" in res.stderr and str(p) in res.stderr
        assert not out.exists()
    res = _cli(p, "--out", out, "--slide-mpp", "1.0", "--max-tiles", "3")
    assert res.exit_code == 0, res.output
    rows = _manifest(out)
    assert len(rows) == 3 and {r["mpp"] for r in rows} == {"1"} and {r["level0_size"] for r in rows} == {"256"}


@pytest.mark.shared
def test_cmu_annotations_restrict_to_polygon(tmp_path):
    p = shared_path("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")
    all_out = tmp_path / "all"
    assert _cli(p, "--out", all_out, "--mpp", "0.5").exit_code == 0
    rows = _manifest(all_out)
    # lower-left quarter of the tissue, as QuPath would export it
    poly = [[0, 1500], [1300, 1500], [1300, 2967], [0, 2967], [0, 1500]]
    ann = tmp_path / "region.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [poly]},
        "properties": {"objectType": "annotation", "classification": {"name": "Region*", "color": [0, 0, 255]}}}]}))
    out = tmp_path / "ann"
    res = _cli(p, "--out", out, "--mpp", "0.5", "--annotations", ann, "--class", "Region*")
    assert res.exit_code == 0, res.output
    sub = _manifest(out)
    inside = {r["file"] for r in rows if int(r["x"]) + 128 < 1300 and int(r["y"]) + 128 > 1500}
    assert 0 < len(sub) < len(rows) and {r["file"] for r in sub} == inside


@pytest.mark.shared
def test_ndpi_name_with_space_and_brackets(tmp_path):
    p = shared_path("hamamatsu-ndpi-stritt", "test3-TRITC 2 (560).ndpi")
    out = tmp_path / "out"
    res = _cli(p, "--out", out, "--mpp", "1.0", "--min-tissue", "0", "--max-tiles", "2")
    assert res.exit_code == 0, res.output
    names = _images(out)
    assert len(names) == 2 and all(n.startswith("test3-TRITC 2 (560)_") for n in names)


@pytest.mark.shared
def test_flat_tiff_kidney_via_pillow(tmp_path):
    """A plain strip TIFF OpenSlide refuses: read whole (it is small); its one tissue fragment is found."""
    p = shared_path("histolab-fixtures", "tests", "fixtures", "tiff-images", "kidney-48-5.tif")
    out = tmp_path / "out"
    res = _cli(p, "--out", out, "--slide-mpp", "8", "--tile-size", "32")  # records no mpp: declare it
    assert res.exit_code == 0, res.output
    rows = _manifest(out)
    assert 1 <= len(rows) <= 10
    for r in rows:  # the fragment sits around level-0 (290-400, 500-570)
        assert 250 <= int(r["x"]) <= 420 and 470 <= int(r["y"]) <= 600


# -- outputs: never over an input, one run at a time, a full disk is one line (issue 13) ---------------------
@pytest.fixture
def slide_copy(synthetic_slide, tmp_path) -> Path:
    p = tmp_path / "data" / "slide.tif"
    p.parent.mkdir()
    p.write_bytes(synthetic_slide.read_bytes())
    return p


@pytest.mark.parametrize("where", ["the slide", "the folder of the slide", "the annotations"])
def test_out_may_not_touch_an_input(slide_copy, tmp_path, where):
    ann = tmp_path / "data" / "ann.geojson"
    ann.write_text(json.dumps({"type": "Feature", "properties": {},
                               "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [900, 0], [900, 900], [0, 0]]]}}))
    out = {"the slide": slide_copy, "the folder of the slide": slide_copy.parent, "the annotations": ann}[where]
    before = {p: sha256(p) for p in (slide_copy, ann)}
    listing = sorted(tmp_path.rglob("*"))
    res = _cli(slide_copy, "--out", out, "--mpp", "0.5", "--annotations", ann)
    one_line_error(res, str(out), "--out")
    assert {p: sha256(p) for p in before} == before and sorted(tmp_path.rglob("*")) == listing


def test_a_second_run_on_the_folder_is_refused(slide_copy, tmp_path):
    from wsi_haloae.fileio import output_lock

    out = tmp_path / "tiles"
    with output_lock(out, "tile folder"):  # what a run in another process holds
        res = _cli(slide_copy, "--out", out, "--mpp", "0.5")
    one_line_error(res, "another wsi-haloae run is writing this tile folder")
    assert not out.exists()
    assert _cli(slide_copy, "--out", out, "--mpp", "0.5").exit_code == 0  # released with its holder


@pytest.mark.parametrize("target, nth", [("slide_", 3), ("tiles.csv", 1), ("slide.png", 1)],
                         ids=["tile", "manifest", "thumbnail"])
def test_full_disk_is_one_line_and_leaves_no_partial_file(slide_copy, tmp_path, monkeypatch, target, nth):
    out = tmp_path / "tiles"
    out.mkdir()
    other = "slide,file,x,y,level0_size,tile_size,mpp,tissue\n/else/b.svs,b_0_0.png,0,0,256,256,0.5,1.0000\n"
    (out / "tiles.csv").write_text(other)  # another slide's rows, which a failed run must not lose
    slide_sha = sha256(slide_copy)
    hits = fill_disk_at(monkeypatch, target, nth)
    res = _cli(slide_copy, "--out", out, "--mpp", "0.5")
    assert hits["hits"] >= nth
    err = one_line_error(res, "(No space left on device)")
    named = {"slide_": "slide_", "tiles.csv": "tiles.csv: cannot write the tile manifest",
             "slide.png": "thumbnails/slide.png: cannot write the thumbnail"}[target]
    assert err.startswith(f"error: {out}/{named}")
    assert sha256(slide_copy) == slide_sha
    assert not [p for p in out.rglob("*") if p.name.endswith(".part") or p.name.endswith(".lock")]
    assert (out / "tiles.csv").read_text() == other  # the manifest, written last, says nothing of this slide
    if target != "tiles.csv":
        assert not (out / "thumbnails" / "slide.png").exists()
    for n in _images(out):  # whatever stands under a final name is a whole image
        Image.open(out / n).load()
    monkeypatch.undo()
    res = _cli(slide_copy, "--out", out, "--mpp", "0.5")  # space freed: the rerun finishes the job
    assert res.exit_code == 0, res.output
    rows = _manifest(out)
    assert rows[0]["file"] == "b_0_0.png" and sorted(r["file"] for r in rows[1:]) == [n for n in _images(out)]


def test_full_disk_in_worker_processes_of_a_real_run(slide_copy, tmp_path):
    """A real kernel write failure (a file-size limit: EFBIG, no root needed) in the pool's worker processes."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # a tile PNG is ~50-60 kB

    out = tmp_path / "tiles"
    r = subprocess.run([sys.executable, "-m", "wsi_haloae.cli", "tiles", str(slide_copy), "--out", str(out),
                        "--mpp", "0.5", "--workers", "2"], capture_output=True, text=True, preexec_fn=small_files,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot write a tile (File too large)" in last and "Traceback" not in r.stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")] and not (out / "tiles.csv").exists()
