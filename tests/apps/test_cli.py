"""The fastguide command: the main job on CPU, bad options, multi-process sampling, the sweep."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastguide.apps import cli, digits

pytestmark = pytest.mark.skipif(
    not (digits.WEIGHTS / "digits_unet.safetensors").is_file(), reason="the digits weights are not built"
)
SMALL = ["--num-samples", "12", "--steps", "6", "--batch-size", "4", "--quiet"]


def test_sample_writes_a_png_grid_and_adm_npz(tmp_path):
    png, npz = tmp_path / "digits.png", tmp_path / "digits.npz"
    assert cli.main(["sample", "--out", str(png), "--npz", str(npz), *SMALL]) == 0
    grid = Image.open(png)
    assert grid.size == ((10 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 10 columns, 2 rows of 8×8 tiles
    data = np.load(npz)
    assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("options, message", [
    (["--model", "imagenet"], "--model: unknown model 'imagenet'"),
    (["--labels", "3-12"], "--labels must lie in 0..9"),
    (["--steps", "-2"], "--steps must be at least 1"),
    (["--out", "/nonexistent-folder/x.png"], "--out: folder /nonexistent-folder does not exist"),
    (["--model", "adm64"], "--model adm64 needs --checkpoint"),
    (["--model", "adm64", "--checkpoint", "/nonexistent.pt"], "--checkpoint: /nonexistent.pt does not exist"),
])
def test_bad_options_exit_with_one_line(tmp_path, options, message):
    result = subprocess.run([sys.executable, "-m", "fastguide", "sample", "--out", str(tmp_path / "x.png"), *options],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("options", [["--guidance", "classifier"], ["--guidance", "both", "--precision", "bf16"],
                                     ["--guidance", "none", "--sampler", "ddpm"]])
def test_sample_options(tmp_path, options):
    assert cli.main(["sample", "--out", str(tmp_path / "x.png"), *SMALL, *options]) == 0


def test_two_processes_give_the_single_process_samples(tmp_path):
    options = ["sample", "--labels", "0-9", "--seed", "3", *SMALL]
    single, merged = tmp_path / "single.npz", tmp_path / "merged.npz"
    assert cli.main([*options, "--npz", str(single), "--out", str(tmp_path / "a.png")]) == 0
    with socket.socket() as probe:  # a free port: a fixed one may still be held by an earlier run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", "-m", "fastguide", *options, "--npz", str(merged), "--out", str(tmp_path / "b.png")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},  # loopback only, whatever the hostname resolves to
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = np.load(single), np.load(merged)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


@pytest.mark.slow
def test_sweep_shows_guidance_raising_accuracy():
    from fastguide.apps import sweep

    rows = sweep.run([0.0, 4.0], samples_per_scale=60, steps=10, progress=False)
    by = {(r["guidance"], r["scale"]): r for r in rows}
    assert by[("cfg", 4.0)]["accuracy"] > by[("cfg", 0.0)]["accuracy"]
    assert by[("classifier", 4.0)]["accuracy"] > by[("classifier", 0.0)]["accuracy"]


def test_frechet_distance_of_known_gaussians():
    from fastguide.apps.sweep import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(0, 2, (20000, 3)) + np.array([1.0, 0, 0])
    # ‖μ‖² + tr(I + 4I − 2·2I) = 1 + 3·(1 + 4 − 4) = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.15)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
