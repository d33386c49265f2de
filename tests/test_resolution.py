"""The resolution rules shared by tiles, infer and cohort (slide/resolution.py), and `tiles` applying them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from wsi_haloae.cli import main
from wsi_haloae.errors import BadInputError, BadSlideError
from wsi_haloae.slide.grid import build_grid
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.slide.resolution import (MAX_UPSAMPLING, Resolution, magnification_to_mpp,
                                         resolve_resolution)


@pytest.mark.parametrize("text, mpp", [("20x", 0.5), ("40X", 0.25), ("10", 1.0), (" 2.5x ", 4.0), (60, 10 / 60),
                                       ("0.5x", 20.0)])
def test_magnification_to_mpp(text, mpp):
    assert magnification_to_mpp(text) == pytest.approx(mpp)


@pytest.mark.parametrize("bad", ["x", "20y", "-20x", "0x", "", "twenty", float("nan"), 0, -4])
def test_bad_magnification_refused(bad):
    with pytest.raises(BadInputError, match="--magnification must be a positive objective power"):
        magnification_to_mpp(bad)


def test_target_sources_in_order():
    r = resolve_resolution("s.svs", 0.25)
    assert (r.target_mpp, r.slide_mpp, r.source, r.warnings) == (0.25, 0.25, "slide", ())
    assert resolve_resolution("s.svs", 0.25, model_mpp=0.5).source == "model"
    r = resolve_resolution("s.svs", 0.25, magnification="20x", model_mpp=0.5)
    assert (r.target_mpp, r.source, r.warnings) == (0.5, "--magnification", ())
    r = resolve_resolution("s.svs", 0.25, mpp=0.5, model_mpp=0.5)
    assert (r.target_mpp, r.source, r.downsample) == (0.5, "--mpp", 2.0)


def test_mpp_and_magnification_together_refused():
    with pytest.raises(BadInputError, match="--mpp or as --magnification, not both"):
        resolve_resolution("s.svs", 0.25, mpp=0.5, magnification="20x")


def test_slide_without_mpp_refused_naming_slide_mpp_whatever_the_target():
    for kw in ({}, {"mpp": 0.5}, {"magnification": "20x"}, {"model_mpp": 0.5}):
        with pytest.raises(BadSlideError, match=r"slide tcga\.svs does not record its resolution.*--slide-mpp"):
            resolve_resolution("tcga.svs", None, **kw)
    r = resolve_resolution("tcga.svs", None, slide_mpp=0.25, model_mpp=0.5)
    assert (r.target_mpp, r.slide_mpp, r.slide_mpp_declared, r.warnings) == (0.5, 0.25, True, ())


def test_declared_slide_mpp_overrides_the_file_with_a_warning_only_when_different():
    r = resolve_resolution("s.svs", 0.499, slide_mpp=0.5)
    assert r.slide_mpp == 0.5 and r.warnings == ()  # within 2 %: the same scan
    r = resolve_resolution("s.svs", 0.25, slide_mpp=0.5)
    assert r.slide_mpp == 0.5 and len(r.warnings) == 1 and "--slide-mpp 0.5 overrides the 0.25" in r.warnings[0]


def test_warning_when_target_is_more_than_10_percent_from_the_model():
    assert resolve_resolution("s.svs", 0.25, mpp=0.549, model_mpp=0.5).warnings == ()
    assert resolve_resolution("s.svs", 0.25, mpp=0.451, model_mpp=0.5).warnings == ()
    for mpp in (0.56, 0.44, 1.0):
        (w,) = resolve_resolution("s.svs", 0.25, mpp=mpp, model_mpp=0.5).warnings
        assert f"scoring at {mpp:g} µm/px but the model was trained at 0.5 µm/px" in w
    (w,) = resolve_resolution("s.svs", 0.25, magnification="10x", model_mpp=0.5).warnings
    assert "scoring at 1 µm/px" in w
    assert resolve_resolution("s.svs", 0.25, mpp=1.0).warnings == ()  # model mpp unknown: nothing to compare
    assert resolve_resolution("s.svs", 0.25, mpp=1.0, model_mpp=float("nan")).warnings == ()


def test_target_more_than_4x_finer_than_level_0_refused():
    assert resolve_resolution("s.svs", 0.5, mpp=0.5 / MAX_UPSAMPLING).target_mpp == 0.125  # exactly 4x: allowed
    with pytest.raises(BadInputError, match=r"s\.svs: target resolution --mpp 0\.001 µm/px is more than 4x finer "
                                            r"than the slide's level 0 \(0\.5 µm/px\).*at least 0\.125"):
        resolve_resolution("s.svs", 0.5, mpp=0.001)
    with pytest.raises(BadInputError, match="--magnification 400x is more than 4x finer"):
        resolve_resolution("s.svs", 0.5, magnification="400x")
    with pytest.raises(BadInputError, match="model 0.05 µm/px is more than 4x finer"):
        resolve_resolution("s.svs", 0.5, model_mpp=0.05)
    with pytest.raises(BadInputError, match="more than 4x finer than the slide's level 0 \\(2 µm/px\\)"):
        resolve_resolution("s.svs", None, slide_mpp=2.0, mpp=0.25)


@pytest.mark.parametrize("kw, name", [({"mpp": 0.0}, "--mpp"), ({"mpp": -1.0}, "--mpp"),
                                      ({"slide_mpp": float("inf")}, "--slide-mpp"), ({"slide_mpp": 0.0}, "--slide-mpp")])
def test_non_positive_values_refused(kw, name):
    with pytest.raises(BadInputError, match=f"{name} must be a positive number"):
        resolve_resolution("s.svs", 0.5, **kw)


def test_grid_from_a_resolution_uses_the_declared_level0(synthetic_slide):
    """--slide-mpp changes the scale (level-0 px per target px) the grid and its reads use."""
    r = SlideReader(synthetic_slide)  # records 0.5 µm/px
    g = build_grid(r, Resolution(target_mpp=1.0, slide_mpp=0.5, source="--mpp"), min_tissue=0)
    assert g.scale == 2.0 and g.slide_mpp == 0.5
    g = build_grid(r, Resolution(target_mpp=1.0, slide_mpp=0.25, source="--mpp", slide_mpp_declared=True), min_tissue=0)
    assert g.scale == 4.0 and g.level0_tile == 1024 and g.slide_mpp == 0.25 and (g.n_rows, g.n_cols) == (2, 2)


# -- the `tiles` command ---------------------------------------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(main, ["tiles", *map(str, args)])


def test_tiles_magnification_is_mpp(synthetic_slide, tmp_path):
    res = _cli(synthetic_slide, "--out", tmp_path / "m", "--magnification", "10x", "--max-tiles", "2")
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "m" / "tiles.csv").read_text().splitlines()
    assert len(rows) == 3 and all(r.split(",")[4:7] == ["512", "256", "1"] for r in rows[1:])  # 1 µm/px: 512 level-0 px


def test_tiles_resolution_errors_are_one_line(synthetic_slide, tmp_path):
    out = tmp_path / "o"
    for args, msg in ((("--mpp", "0.5", "--magnification", "20x"), "not both"),
                      (("--mpp", "0.01"), "more than 4x finer"),
                      (("--magnification", "lots"), "--magnification must be")):
        res = _cli(synthetic_slide, "--out", out, *args)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and msg in res.stderr, res.output
        assert res.stderr.startswith("error: ")
    assert not out.exists()


def test_tiles_flat_image_without_mpp_needs_slide_mpp(tmp_path):
    from PIL import Image

    p = tmp_path / "plain.png"
    Image.new("RGB", (600, 600), (160, 60, 120)).save(p)
    res = _cli(p, "--out", tmp_path / "o", "--mpp", "0.5")
    assert res.exit_code == 2 and "--slide-mpp" in res.stderr and str(p) in res.stderr
    res = _cli(p, "--out", tmp_path / "o", "--slide-mpp", "0.25", "--magnification", "20x", "--tile-size", "64",
               "--min-tissue", "0")
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "o" / "tiles.csv").read_text().splitlines()[1:]
    assert len(rows) == 16 and {r.split(",")[4] for r in rows} == {"128"}  # 600 px at 0.25 -> 4x4 tiles of 128

