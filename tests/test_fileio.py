"""fileio: atomic outputs, the output-vs-input guard and the per-output lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from wsi_haloae.errors import OutputError
from wsi_haloae.fileio import atomic_output, guard_outputs, lock_name, output_lock, write_text_atomic


def test_atomic_output_uses_umask_and_cleans_up(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "a.txt"
        with atomic_output(p) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # a writer that creates 0600 files
            os.write(fd, b"x")
            os.close(fd)
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        with pytest.raises(RuntimeError):
            with atomic_output(tmp_path / "b.txt") as tmp:
                tmp.write_text("half")
                raise RuntimeError("boom")
        assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]
    finally:
        os.umask(old)


def test_atomic_output_turns_oserror_into_one_line(tmp_path):
    with pytest.raises(OutputError, match=r"b\.txt: cannot write table \(No space left on device\)"):
        with atomic_output(tmp_path / "b.txt", "table"):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["same", "symlink", "hardlink", "inside_input_dir", "holds_input", "relative"])
def test_guard_refuses_outputs_that_touch_inputs(tmp_path, case, monkeypatch):
    slide = tmp_path / "s.svs"
    slide.write_bytes(b"slide")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    inputs = {"slide": slide, "tiles": tiles}
    if case == "same":
        out = slide
    elif case == "symlink":
        out = tmp_path / "link.tif"
        out.symlink_to(slide)
    elif case == "hardlink":
        out = tmp_path / "hard.tif"
        os.link(slide, out)
    elif case == "inside_input_dir":
        out = tiles / "model.safetensors"
    elif case == "holds_input":
        out = tmp_path
    else:
        monkeypatch.chdir(tmp_path)
        out = type(slide)("./sub/../s.svs")
    with pytest.raises(OutputError) as ei:
        guard_outputs({"--tiff": out}, inputs)
    assert "\n" not in str(ei.value) and str(out) in str(ei.value)
    assert slide.read_bytes() == b"slide"


def test_guard_outputs_must_differ_and_not_nest(tmp_path):
    with pytest.raises(OutputError, match="same path"):
        guard_outputs({"--out": tmp_path / "a.zarr", "--tiff": tmp_path / "a.zarr"}, {})
    with pytest.raises(OutputError, match="inside another output"):
        guard_outputs({"--out": tmp_path / "a.zarr", "--preview": tmp_path / "a.zarr" / "p.png"}, {})
    guard_outputs({"--out": tmp_path / "a.zarr", "--tiff": tmp_path / "a.tif", "x": None}, {"slide": tmp_path / "s.svs"})


def test_output_lock_refuses_a_second_process_and_is_released(tmp_path):
    out = tmp_path / "x.zarr"
    script = textwrap.dedent(f"""
        import sys
        from wsi_haloae.errors import OutputError
        from wsi_haloae.fileio import output_lock
        try:
            with output_lock(__import__('pathlib').Path({str(out)!r})):
                print("got it")
        except OutputError as e:
            print("refused:", e)
    """)
    with output_lock(out) as lock:
        assert lock == lock_name(out) and lock.exists()
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert r.stdout.startswith("refused:") and "another wsi-haloae run" in r.stdout
    assert not lock_name(out).exists()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "got it"


def test_write_text_atomic(tmp_path):
    write_text_atomic(tmp_path / "t.txt", "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"


def test_publish_is_all_or_none(tmp_path):
    from wsi_haloae.fileio import partial_name, publish

    a, b = tmp_path / "a.tif", tmp_path / "b.zarr"
    a.write_text("old a")
    b.mkdir()
    (b / "x").write_text("old b")
    ta, tb = partial_name(a), partial_name(b)
    assert ta.name == ".a.tif.partial.tif" and tb.name == ".b.zarr.partial.zarr"
    ta.write_text("new a")
    with pytest.raises(OSError):  # the store's temp is missing: nothing may change
        publish([(ta, a), (tb, b)])
    assert a.read_text() == "old a" and (b / "x").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.zarr"]  # no .old left behind
    ta.write_text("new a")
    tb.mkdir()
    (tb / "y").write_text("new b")
    publish([(ta, a), (tb, b)])
    assert a.read_text() == "new a" and sorted(p.name for p in b.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.zarr"]  # the old ones are gone
