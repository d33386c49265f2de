"""The output registry (infer/outputs.py) and the one InferOptions object shared by infer, cohort and the CLI."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from wsi_haloae.config import CohortConfig, InferOptions
from wsi_haloae.errors import BadInputError
from wsi_haloae.infer import outputs


def test_planned_paths_follow_the_requests():
    p = outputs.planned(Path("o.zarr"), {"tiff": Path("h.ome.tif"), "geojson": None, "preview": Path("p.png")})
    assert p == {"zarr": Path("o.zarr"), "tiff": Path("h.ome.tif"), "tiff_rgb": Path("h.rgb.ome.tif"),
                 "preview": Path("p.png")}
    assert outputs.requests(p) == {"tiff": Path("h.ome.tif"), "preview": Path("p.png")}
    with pytest.raises(BadInputError, match="unknown output"):
        outputs.planned(Path("o.zarr"), {"pdf": Path("x.pdf")})


def test_cohort_names_agree_with_the_paths_infer_derives(tmp_path):
    """A cohort asks infer for the option's file; infer derives the others: both must name the same files."""
    paths = outputs.cohort_paths(tmp_path, "s1", outputs.COHORT_DEFAULT)
    assert {k.name for k in outputs.KINDS} == set(paths)
    assert outputs.planned(paths["zarr"], outputs.requests(paths)) == paths
    assert paths["tiff_rgb"] == tmp_path / "s1.rgb.ome.tiff"
    assert outputs.cohort_paths(tmp_path, "s1", ()) == {"zarr": tmp_path / "s1.zarr"}


def test_each_kind_is_complete_only_when_whole(tmp_path):
    assert not outputs.BY_NAME["geojson"].is_complete(tmp_path / "t.geojson")
    (tmp_path / "t.geojson").write_text("{}")
    assert outputs.BY_NAME["geojson"].is_complete(tmp_path / "t.geojson")
    (tmp_path / "s.zarr").mkdir()
    assert not outputs.STORE.is_complete(tmp_path / "s.zarr")  # a folder without its marker


def test_labels_name_the_users_options():
    assert outputs.labelled({"zarr": Path("a"), "tiff": Path("b"), "tiff_rgb": Path("c")}) == {
        "--out": Path("a"), "--tiff": Path("b"), "the colour OME-TIFF of --tiff": Path("c")}


def test_infer_options_are_checked_once_for_every_caller():
    with pytest.raises(BadInputError, match="--batch-size 0"):
        InferOptions(batch_size=0)
    with pytest.raises(BadInputError, match="--min-tissue"):
        InferOptions(min_tissue=1.5)
    with pytest.raises(BadInputError, match="--mpp"):
        InferOptions(mpp=-1.0)
    assert CohortConfig(slides="x", model=Path("m"), out=Path("o")).options == InferOptions()


def test_the_cli_declares_each_infer_option_once_for_both_commands():
    """infer and cohort expose the same InferOptions fields with the same defaults, from one declaration."""
    from wsi_haloae.cli import cohort, infer

    def declared(cmd):
        return {p.name: p for p in cmd.params if p.name in {f.name for f in fields(InferOptions)}}

    a, b = declared(infer), declared(cohort)
    assert set(a) == set(b) >= {"mpp", "batch_size", "workers", "device", "pixel_downsample", "min_tissue"}
    defaults = InferOptions()
    for name in a:
        assert a[name].default == b[name].default
        if a[name].default is not None:
            assert a[name].default == getattr(defaults, name), name
    assert "--workers" in a["workers"].opts and "--infer-workers" in b["workers"].opts
    # every extra output of the registry is an option of both commands
    assert set(outputs.OPTIONS) <= {p.name for p in infer.params} and set(outputs.OPTIONS) <= {p.name for p in cohort.params}
