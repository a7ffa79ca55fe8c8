"""The SD v1.5 speed benchmark's quick mode (tiny networks) as a regression check: it must run end to end and
find every output of ours in agreement with diffusers (it exits non-zero otherwise). Its timings and ratios
are printed, never asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_sd15_speed_quick_mode_runs_and_outputs_agree(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "sd15_speed.py"), "--quick", "--repeats", "1",
                                "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    print(completed.stdout)                       # the ratios, for whoever reads the CI log
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for config in ("ref-fp32", "ref-bf16", "ours-fp32", "ours-bf16"):
        assert f"{config}: done" in out
    assert "ours-bf16/ref-fp32" in out and "FAILS" not in out
    assert "ours-fp32      unet-8 max|diff|" in out


def test_time_to_image_quick_mode_runs_every_recipe_and_images_agree(tmp_path):
    pytest.importorskip("diffusers")
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_image.py"), "--quick",
                                "--ours-dtype", "fp32", "--work", str(tmp_path)],
                               capture_output=True, text=True, timeout=600)
    print(completed.stdout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for recipe in ("a", "b", "c"):
        assert f"\nrecipe {recipe}: " in out
    assert out.count("TIME TO IMAGE") == 4 and "measured peak GFLOP/s" in out
    assert out.count("ours (vae) against ref-fp32: max|diff|") == 2 and "FAILS" not in out
    assert "ours (taesd) against ref-fp32: max|diff|" in out


def test_tome_speed_quick_mode_reports_speed_and_psnr_per_ratio():
    completed = subprocess.run([sys.executable, str(BENCHMARKS / "tome_speed.py"), "--quick"],
                               capture_output=True, text=True, timeout=600)
    print(completed.stdout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = [line.split() for line in completed.stdout.splitlines() if line[:6].strip().startswith("0.")]
    assert [row[0] for row in rows] == ["0.00", "0.30", "0.50", "0.70"]
    assert rows[0][5] == "inf" and all(float(row[5]) < 200 for row in rows[1:])    # merging moves the image
