"""The `mrc` command line: tables, JSON, sheets, and one-line errors for every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carve3d_reward.cli import main
from carve3d_reward.grid import join_grid, to_uint8_image
from carve3d_reward.layouts import INSTANT3D_2X2

FAST = ["--view-size", "64", "--carve-resolution", "32", "--carve-samples", "64"]


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory, clean_views) -> Path:
    folder = tmp_path_factory.mktemp("grids")
    grids = join_grid(clean_views[:3], INSTANT3D_2X2)
    for i, g in enumerate(grids):
        Image.fromarray(to_uint8_image(g)).save(folder / f"grid{i}.png")
    (folder / "nested").mkdir()
    Image.fromarray(to_uint8_image(grids[0])).save(folder / "nested" / "again.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image, ignored by folder expansion")
    return folder


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("mrc: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_score_folder_json(grid_dir, capsys) -> None:
    code, out, _ = run(["score", str(grid_dir), "--json", *FAST], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [Path(r["file"]).name for r in rows] == ["grid0.png", "grid1.png", "grid2.png", "again.jpg"]
    for r in rows:
        assert r["status"] == "ok" and 0 <= r["mrc"] < 0.1 and r["reward"] == -r["mrc"]
        assert len(r["views"]) == 4 and r["metric"].startswith("mrc/carve+l1/")
    # The JPEG copy of grid0 scores close to the PNG (lossy, but the same object).
    assert abs(rows[3]["mrc"] - rows[0]["mrc"]) < 0.02


def test_score_table_and_sheets(grid_dir, tmp_path, capsys) -> None:
    sheets = tmp_path / "sheets"
    code, out, _ = run(["score", str(grid_dir / "grid1.png"), "--save-renders", str(sheets), *FAST], capsys)
    assert code == 0
    assert "grid1.png" in out and "MRC" in out and "ok" in out
    sheet = sheets / "grid1.sheet.png"
    assert sheet.exists()
    with Image.open(sheet) as img:
        assert img.width > 5 * 64 and img.height > 4 * 64


@pytest.mark.slow
def test_same_file_gives_same_score_as_library(grid_dir, capsys, clean_views) -> None:
    from carve3d_reward.metric import MRC
    from carve3d_reward.settings import MetricSettings

    code, out, _ = run(["score", str(grid_dir / "grid0.png"), "--json", *FAST], capsys)
    assert code == 0
    settings = MetricSettings(view_size=64, carve_resolution=32, carve_samples=64)
    # The PNG holds 8-bit values; score the same quantised grid in memory.
    grid = join_grid(clean_views[:1], INSTANT3D_2X2)
    quantised = np.asarray(to_uint8_image(grid[0]), dtype=np.float32) / 255.0
    import torch

    expected = MRC(settings)(torch.from_numpy(quantised).permute(2, 0, 1)[None]).mrc.item()
    assert json.loads(out)[0]["mrc"] == pytest.approx(expected, abs=1e-6)


def test_conversions_are_accepted(tmp_path, clean_views, capsys) -> None:
    grid = to_uint8_image(join_grid(clean_views[:1], INSTANT3D_2X2)[0])
    Image.fromarray(grid).convert("L").save(tmp_path / "gray.png")
    rgba = np.concatenate([grid, np.full((*grid.shape[:2], 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(grid[..., 0].astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    code, out, _ = run(["score", str(tmp_path), "--json", *FAST], capsys)
    assert code == 0
    assert {Path(r["file"]).name: r["status"] for r in json.loads(out)} == {
        "gray.png": "ok",
        "rgba.png": "ok",
        "sixteen.png": "ok",
    }


def test_bad_files_in_a_folder_are_flagged_not_fatal(grid_dir, tmp_path, capsys) -> None:
    (tmp_path / "a_good.png").write_bytes((grid_dir / "grid0.png").read_bytes())
    (tmp_path / "b_random.png").write_bytes(os.urandom(300))
    Image.new("RGB", (129, 128), "white").save(tmp_path / "c_odd.png")
    Image.new("RGB", (20, 20), "white").save(tmp_path / "d_tiny.png")
    code, out, _ = run(["score", str(tmp_path), "--json", *FAST], capsys)
    assert code == 1
    rows = {Path(r["file"]).name: r for r in json.loads(out)}
    assert rows["a_good.png"]["status"] == "ok"
    assert rows["b_random.png"]["status"] == "invalid" and "not a decodable image" in rows["b_random.png"]["error"]
    assert rows["c_odd.png"]["status"] == "invalid" and "does not split" in rows["c_odd.png"]["error"]
    assert rows["d_tiny.png"]["status"] == "invalid" and "too small" in rows["d_tiny.png"]["error"]


def test_single_bad_file_is_a_one_line_error(tmp_path, capsys) -> None:
    bad = tmp_path / "oops.png"
    bad.write_text("hello")
    code, _, err = run(["score", str(bad), *FAST], capsys)
    assert_one_line_error(code, err, "oops.png", "not a decodable image")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["score", "{empty}"], ("no images found",)),
        (["score", "{missing}"], ("no such file or folder",)),
        (["score", "{good}", "--view-size", "5"], ("--view-size",)),
        (["score", "{good}", "--fov-deg", "abc"], ("--fov-deg",)),
        (["score", "{good}", "--distance", "lpips-alex", "--view-size", "64"], ("mrc weights fetch --lpips alex",)),
        (["score", "{good}", "--reconstructor", "lrm"], ("lrm",)),
        (["validate", "--kinds", "melt"], ("unknown inconsistency kind",)),
        (["validate", "--levels", "0,2"], ("levels must be",)),
    ],
)
def test_usage_errors_are_one_line(argv, needles, tmp_path, grid_dir, capsys, monkeypatch) -> None:
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    (tmp_path / "empty").mkdir()
    subs = {"{empty}": str(tmp_path / "empty"), "{missing}": str(tmp_path / "nope"), "{good}": str(grid_dir)}
    code, _, err = run([subs.get(a, a) for a in argv], capsys)
    assert_one_line_error(code, err, *needles)


def test_weights_fetch_offline_is_a_clear_error(tmp_path, capsys, monkeypatch) -> None:
    import urllib.error

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, _, err = run(["weights", "fetch", "--lpips", "alex"], capsys)
    assert_one_line_error(code, err, "could not download")


@pytest.mark.slow
def test_validate_writes_plot_and_tables(tmp_path, capsys) -> None:
    out_dir = tmp_path / "val"
    argv = ["validate", "--objects", "2", "--levels", "0,1", "--kinds", "patch,colour", "--distances", "l1"]
    code, out, _ = run([*argv, "--out", str(out_dir), *FAST], capsys)
    assert code == 0
    report = json.loads((out_dir / "validate.json").read_text())
    assert {c["kind"] for c in report["curves"]} == {"patch", "colour"}
    for curve in report["curves"]:
        assert len(curve["mean"]) == 2 and curve["mean"][1] > curve["mean"][0]
    for name in ("validate.png", "examples.png", "validate.md"):
        assert (out_dir / name).stat().st_size > 0
    assert "monotone" in out


@pytest.mark.slow
def test_demo_runs_and_ranks_consistent_grids_lowest(tmp_path, capsys) -> None:
    code, out, _ = run(["demo", "--out", str(tmp_path), "--objects", "2", *FAST], capsys)
    assert code == 0
    assert "consistent grids score lowest" in out
    assert len(list((tmp_path / "sheets").glob("*.sheet.png"))) == 8
    assert len(json.loads((tmp_path / "scores.json").read_text())) == 8


@pytest.mark.slow
def test_console_script_runs_without_traceback(tmp_path) -> None:
    exe = Path(sys.executable).with_name("mrc")
    proc = subprocess.run([str(exe), "score", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mrc: error:") and "Traceback" not in proc.stderr
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "mrc" in version.stdout


@pytest.mark.slow
def test_cameras_figure_command(tmp_path, capsys) -> None:
    out = tmp_path / "cams.png"
    code, text, _ = run(["cameras", "--out", str(out), "--azimuth0-deg", "45"], capsys)
    assert code == 0 and str(out) in text
    with Image.open(out) as img:
        assert img.width > 800 and img.height > 500
    code, _, err = run(["cameras", "--out", str(out), "--layout", "3x2"], capsys)
    assert_one_line_error(code, err, "layout")
