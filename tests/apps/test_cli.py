"""The fastguide command: the main job on CPU, bad options, multi-process sampling, the sweep."""

import datetime
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastguide
from fastguide.apps import cli, digits
from fastguide.ops import backends
from tests.helpers import fails_with

pytestmark = pytest.mark.skipif(
    not (digits.WEIGHTS / "digits_unet.safetensors").is_file(), reason="the digits weights are not built"
)
SMALL = ["--num-samples", "12", "--steps", "6", "--batch-size", "4", "--quiet"]


def test_the_grid_upscales_small_samples_only(tmp_path):
    sizes = {}
    for side in (8, 64):
        cli.save_grid(cli.to_uint8_nhwc(torch.rand(3, 3, side, side) * 2 - 1), tmp_path / f"{side}.png", columns=3)
        sizes[side] = Image.open(tmp_path / f"{side}.png").size
    assert sizes == {8: ((3 * 9 + 1) * 4, (9 + 1) * 4), 64: (3 * 65 + 1, 65 + 1)}


def test_the_digits_unet_does_not_read_the_flow_transformer(tmp_path):
    # --model digits loaded (and failed on) the transformer it never uses
    import shutil

    folder = tmp_path / "weights"
    shutil.copytree(digits.WEIGHTS, folder)
    digits.transformer_file(folder).write_bytes(b"\0" * 16)
    assert cli.main(["sample", "--checkpoint", str(folder), "--out", str(tmp_path / "d.png"), *SMALL]) == 0


def test_pixels_convert_as_adm_writes_them():
    # guided-diffusion's image_sample.py: ((x + 1) * 127.5).clamp(0, 255).to(uint8), which
    # truncates (rounding put about half the pixels a level above ADM's own), then NHWC.
    images = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.003, 0.5, 0.999, 1.0, 3.0]).view(1, 1, 3, 3)
    pixels = cli.to_uint8_nhwc(images.expand(2, 3, 3, 3) * torch.tensor([1.0, -1.0, 0.5]).view(1, 3, 1, 1))
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 3, 3, 3)
    assert pixels[0, :, :, 0].ravel().tolist() == [0, 0, 0, 127, 127, 191, 254, 255, 255]
    assert pixels[1, :, :, 1].ravel().tolist() == [255, 255, 254, 127, 127, 63, 0, 0, 0]


def test_sample_writes_a_png_grid_and_adm_npz(tmp_path):
    png, npz = tmp_path / "digits.png", tmp_path / "digits.npz"
    assert cli.main(["sample", "--out", str(png), "--npz", str(npz), *SMALL]) == 0
    grid = Image.open(png)
    assert grid.size == ((10 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 10 columns, 2 rows of 8×8 tiles
    data = np.load(npz)
    assert data["arr_0"].shape == (12, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--model", "imagenet"],
            "--model: expected one of digits, digits-transformer, adm64, adm128, adm256, adm256-uncond, adm512, "
            "got 'imagenet'",
        ),
        (["--labels", "3-12"], "--labels: expected classes in 0..9, got '3-12'"),
        (["--labels", "3-1"], "--labels: expected a range LOW-HIGH with LOW <= HIGH, got '3-1'"),
        (["--steps", "-2"], "--steps: expected an integer from 1 to 1000"),
        (["--out", "/nonexistent-folder/x.png"], "--out: folder /nonexistent-folder does not exist"),
        (["--model", "adm64"], "--checkpoint: expected the guided-diffusion .pt or .safetensors file of --model adm64"),
        (["--model", "adm64", "--checkpoint", "/nonexistent.pt"], "--checkpoint: /nonexistent.pt does not exist"),
    ],
)
def test_bad_options_exit_with_one_line(tmp_path, options, message):
    result = subprocess.run(
        [sys.executable, "-m", "fastguide", "sample", "--out", str(tmp_path / "x.png"), *options],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fastguide: error: ")
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# Bad input, in process: exit status 2, one line naming the option, no file written.
# Each test runs in an empty tmp_path (the working directory), so a default output path
# would land there too.

needs_cpu_only_torch = pytest.mark.skipif(
    torch.version.cuda is not None or torch.version.hip is not None,
    reason="checks the message of a CPU-only build of PyTorch",
)


SAMPLE = ["sample", "--out", "x.png", "--quiet"]


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--steps", "1001"],
            "--steps: expected an integer from 1 to 1000 for the 1000-timestep schedule of --model digits, got 1001",
        ),
        # the strided grid takes at most T/2 steps; the others (the default logsnr) up to T
        (
            ["--spacing", "adm", "--steps", "600"],
            "--steps: expected an integer from 1 to 500 for the 1000-timestep schedule of --model digits, got 600",
        ),
        (["--steps", "0"], "--steps: expected an integer from 1 to 1000"),
        (["--steps", "-3"], "--steps: expected an integer from 1 to 1000"),
        (["--steps", "abc"], "--steps: invalid int value: 'abc'"),
        (["--num-samples", "0"], "--num-samples: expected an integer between 1 and 10,000,000, got 0"),
        (["--num-samples", str(10**10)], f"--num-samples: expected an integer between 1 and 10,000,000, got {10**10}"),
        (["--batch-size", "-1"], "--batch-size: expected an integer of at least 1, got -1"),
        (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
        (["--device", "cuda:abc"], "--device: expected cpu, cuda or cuda:N, got 'cuda:abc'"),
        (["--device", "mps"], "--device: expected cpu, cuda or cuda:N, got 'mps'"),
        (["--scale", "nan"], "--scale: expected a finite number from 0 to 3.403e+38, got nan"),
        (["--scale", "inf"], "--scale: expected a finite number from 0 to 3.403e+38, got inf"),
        (["--scale", "-1"], "--scale: expected a finite number from 0 to 3.403e+38, got -1.0"),
        (
            ["--guidance", "classifier", "--classifier-scale", "nan"],
            "--classifier-scale: expected a finite number from 0 to 3.403e+38, got nan",
        ),
        # a scale the guidance does not use would be ignored without a word
        (["--guidance", "none", "--scale", "3"], "--scale: applies to --guidance cfg, cfg++, auto, both, not none"),
        (["--guidance", "classifier", "--scale", "3"], "--scale: applies to --guidance cfg, cfg++, auto, both"),
        (["--classifier-scale", "7"], "--classifier-scale: applies to --guidance classifier, both, not cfg"),
        (["--out", "x.xyz"], "--out: expected an image file name that PIL can write"),
        (["--out", "x"], "--out: expected an image file name that PIL can write"),
        (["--out", "missing/x.png"], "--out: folder"),
        (["--npz", "missing/x.npz"], "--npz: folder"),
        (["--seed", str(2**70)], f"--seed: expected an integer from 0 to {(2**64 - 1) // 1_000_003}, got {2**70}"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to"),
        # batch 1,000,003 of seed s would draw as batch 0 of seed s + 1
        (
            ["--num-samples", "10000000", "--batch-size", "5"],
            "--batch-size: 10,000,000 samples in batches of 5 are 2,000,000 batches, past the 1,000,003",
        ),
        (["--backend", "bogus"], "--backend: invalid choice: 'bogus'"),
        (["--labels", "3-12"], "--labels: expected classes in 0..9, got '3-12'"),
        (["--labels", "0-1000000000000"], "--labels: expected classes in 0..9, got '0-1000000000000'"),
        (["--scale", "3e38", "--schedule", "linear"], "--scale: --schedule linear peaks at 1 + 2(w − 1)"),
        (["--labels", "x"], "--labels: expected a class, a range like 0-9 or a list like 1,4,7, got 'x'"),
        (
            ["--model", "imagenet"],
            "--model: expected one of digits, digits-transformer, adm64, adm128, adm256, adm256-uncond, adm512, "
            "got 'imagenet'",
        ),
        (["--sampler", "bogus"], "--sampler: invalid choice: 'bogus'"),
        (["--guidance", "bogus"], "--guidance: invalid choice: 'bogus'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (
            ["--guidance", "cfg++", "--scale", "2"],
            "--scale: expected CFG++'s λ in [0, 1] with --guidance cfg++, got 2.0",
        ),
        (
            ["--guidance", "cfg++", "--scale", "0.5", "--sampler", "unipc"],
            "--sampler: --guidance cfg++ is built for ddim, euler, dpm++2m, got unipc",
        ),
        (
            ["--guidance", "cfg++", "--sampler", "dpm++2m", "--interval", "0.3", "5"],
            "--interval: --guidance cfg++ on dpm++2m reads every call's unconditional x0",
        ),
        (
            ["--guidance", "cfg++", "--scale", "0.5", "--sampler", "ddim", "--schedule", "linear"],
            "--schedule: applies to --guidance cfg or both, not cfg++",
        ),
        (["--guidance", "none", "--schedule", "linear"], "--schedule: applies to --guidance cfg, cfg++, both"),
        (["--scale", "1e39"], "--scale: expected a finite number from 0 to 3.403e+38, got 1e+39"),
        (["--guidance", "classifier", "--tangential"], "--tangential: applies to --guidance cfg, cfg++, both"),
        (["--interval", "3", "1"], "--interval: expected LOW HIGH with 0 <= LOW < HIGH"),
        (["--interval", "nan", "1"], "--interval: expected LOW HIGH with 0 <= LOW < HIGH"),
        (["--schedule", "exponential"], "--schedule: invalid choice: 'exponential'"),
        (["--spacing", "uniform"], "--spacing: invalid choice: 'uniform'"),
        (
            ["--sampler", "euler-maruyama"],
            "--sampler: expected one of ddim, ddpm, euler, euler-ancestral, heun, dpm++2m, "
            "dpm++2m-sde, dpm++2s, dpm++3m, unipc for the variance-preserving schedule of "
            "--model digits, got euler-maruyama",
        ),
        (
            ["--model", "digits-transformer", "--sampler", "ddpm"],
            "--sampler: expected one of ddim, euler, heun, dpm++2m, dpm++2s, dpm++3m, unipc, euler-maruyama "
            "for the flow path of --model digits-transformer, got ddpm",
        ),
        (
            ["--model", "adm64", "--checkpoint", "x.pt", "--guidance", "none", "--sampler", "euler-maruyama"],
            "--sampler: expected one of ddim, ddpm",
        ),
        (
            ["--model", "digits-transformer", "--steps", "1001"],
            "--steps: expected an integer from 1 to 1000 for the flow path of --model digits-transformer, got 1001",
        ),
        (["--model", "digits-transformer", "--steps", str(10**12)], "--steps: expected an integer from 1 to 1000"),
        (
            ["--model", "digits-transformer", "--precision", "fp16"],
            "--precision: fp16 is ADM's use_fp16 (a UNet's convolutions in fp16), which --model "
            "digits-transformer does not have",
        ),
    ],
)
def test_sample_refuses_bad_options(workdir, capsys, options, message):
    fails_with(capsys, workdir, [*SAMPLE, *options], message)


def test_sample_refuses_a_sampler_off_the_schedule_before_loading_a_model(workdir, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load_sampling_model", no_loading)
    fails_with(
        capsys,
        workdir,
        [*SAMPLE, "--model", "digits-transformer", "--sampler", "dpm++2m-sde"],
        "--sampler: expected one of",
        "got dpm++2m-sde",
    )


def test_sample_refuses_a_folder_as_npz(workdir, capsys):
    # np.savez(FOLDER) would write FOLDER.npz beside the folder.
    (workdir / "samples").mkdir()
    fails_with(capsys, workdir, [*SAMPLE, "--npz", "samples"], "--npz: expected a file name, got the folder samples")


def test_sample_refuses_an_existing_folder_as_output(workdir, capsys):
    (workdir / "x.png").mkdir()
    fails_with(capsys, workdir, SAMPLE, "--out: expected a file name, got the folder x.png")


@needs_cpu_only_torch
@pytest.mark.parametrize("command", [SAMPLE, ["selfcheck"], ["sweep", "--quiet"]])
def test_cuda_on_a_cpu_build_of_torch(workdir, capsys, command):
    fails_with(
        capsys,
        workdir,
        [*command, "--device", "cuda"],
        "--device: got 'cuda', but this PyTorch (" + torch.__version__ + ") is a CPU-only build",
    )


def test_backend_that_cannot_run_says_why(workdir, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton then cannot run on CPU tensors
    reason = backends.why_not("triton", torch.device("cpu"))
    assert reason is not None
    fails_with(
        capsys,
        workdir,
        [*SAMPLE, "--backend", "triton"],
        f"--backend: the triton backend cannot run on cpu here: {reason}",
    )
    monkeypatch.setenv("FASTGUIDE_BACKEND", "triton")
    fails_with(capsys, workdir, SAMPLE, f"FASTGUIDE_BACKEND: the triton backend cannot run on cpu here: {reason}")
    fails_with(capsys, workdir, ["selfcheck"], "FASTGUIDE_BACKEND: the triton backend cannot run on cpu here")


def test_bad_backend_variable(workdir, capsys, monkeypatch):
    monkeypatch.setenv("FASTGUIDE_BACKEND", "bogus")
    fails_with(capsys, workdir, SAMPLE, "FASTGUIDE_BACKEND: expected one of auto, torch, triton, cuda, got 'bogus'")


def _fake_generate(record):
    """Stands in for cli.generate: records the backend in force, returns blank samples."""

    def generate(model, labels, **options):
        record.append(backends.get_backend())
        return {0: torch.zeros(len(labels), *model.shape)}

    return generate


def test_backend_variable_applies_unless_backend_is_given(workdir, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "generate", _fake_generate(seen))
    monkeypatch.setenv("FASTGUIDE_BACKEND", "torch")
    assert cli.main(SAMPLE) == 0
    assert cli.main([*SAMPLE, "--backend", "auto"]) == 0
    assert seen == ["torch", "auto"]
    assert backends.get_backend() == "torch"  # --backend held for the run only


def _broken_files(folder):
    """name -> path: a missing file, a folder, an empty file, garbage bytes."""
    (folder / "folder.pt").mkdir()
    (folder / "empty.pt").write_bytes(b"")
    (folder / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    return {"missing": "missing.pt", "folder": "folder.pt", "empty": "empty.pt", "garbage": "garbage.pt"}


BROKEN_MESSAGES = {
    "missing": "missing.pt does not exist",
    "folder": "expected a .pt or .safetensors file, got the folder folder.pt",
    "empty": "expected a .pt or .safetensors file, got the empty file empty.pt",
    "garbage": "",  # the loader's own words, with the path
}


@pytest.mark.parametrize("kind", ["missing", "folder", "empty"])
def test_broken_adm_checkpoint(workdir, capsys, kind):
    path = _broken_files(workdir)[kind]
    fails_with(
        capsys,
        workdir,
        [*SAMPLE, "--model", "adm64", "--checkpoint", path, "--guidance", "none"],
        f"--checkpoint: {BROKEN_MESSAGES[kind]}",
    )


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "garbage"])
def test_broken_classifier_checkpoint(workdir, capsys, kind):
    path = _broken_files(workdir)[kind]
    fails_with(
        capsys,
        workdir,
        [*SAMPLE, "--guidance", "classifier", "--classifier-checkpoint", path],
        f"--classifier-checkpoint: {BROKEN_MESSAGES[kind]}",
        path,
    )


@pytest.mark.parametrize("guidance", ["cfg", "cfg++", "none"])
def test_classifier_checkpoint_without_classifier_guidance_is_refused(workdir, capsys, guidance):
    # It used to be loaded and ignored: the user asked for something the run did not do.
    fails_with(
        capsys,
        workdir,
        [
            *SAMPLE,
            "--guidance",
            guidance,
            *(["--scale", "0.5"] if guidance == "cfg++" else []),
            "--classifier-checkpoint",
            "c.pt",
        ],
        f"--classifier-checkpoint: --guidance {guidance} uses no classifier",
    )


def test_broken_digits_checkpoint_folder(workdir, capsys):
    files = _broken_files(workdir)
    fails_with(capsys, workdir, [*SAMPLE, "--checkpoint", "missing"], "--checkpoint: missing does not exist")
    fails_with(
        capsys,
        workdir,
        [*SAMPLE, "--checkpoint", files["garbage"]],
        "--checkpoint: expected a folder written by 'fastguide train', got the file garbage.pt",
    )
    fails_with(
        capsys,
        workdir,
        [*SAMPLE, "--checkpoint", files["folder"]],
        "--checkpoint: folder.pt/digits_unet.safetensors does not exist",
    )
    weights = workdir / "weights"
    weights.mkdir()
    for name in ("unet", "classifier", "evaluator"):
        (weights / f"digits_{name}.safetensors").write_bytes(
            (digits.WEIGHTS / f"digits_{name}.safetensors").read_bytes()[:200]
        )
    fails_with(
        capsys, workdir, [*SAMPLE, "--checkpoint", "weights"], "--checkpoint: ", "weights/digits_unet.safetensors"
    )


def test_adm_guidance_needs_what_the_model_has(workdir, capsys):
    _broken_files(workdir)  # garbage.pt: the options are refused before it is read
    adm = [*SAMPLE, "--model", "adm64", "--checkpoint", "garbage.pt"]
    fails_with(capsys, workdir, [*adm, "--guidance", "cfg"], "--guidance: cfg needs a model with a null class")
    fails_with(
        capsys,
        workdir,
        [*adm, "--guidance", "classifier"],
        "--guidance: classifier needs --classifier-checkpoint with --model adm64",
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (["--unet-steps", "0"], "--unet-steps: expected an integer of at least 1, got 0"),
        (["--classifier-steps", "-5"], "--classifier-steps: expected an integer of at least 1, got -5"),
        (["--evaluator-steps", "0"], "--evaluator-steps: expected an integer of at least 1, got 0"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to 18446744073709551615, got -1"),
        (["--seed", str(2**64)], "--seed: expected an integer from 0 to 18446744073709551615"),
        # another network's steps beside --only: ignored, so refused
        (
            ["--only", "guide", "--unet-steps", "10"],
            "--unet-steps: trains a network that --only guide leaves as it is",
        ),
        (
            ["--only", "transformer", "--guide-steps", "10"],
            "--guide-steps: trains a network that --only transformer leaves as it is",
        ),
    ],
)
def test_train_refuses_bad_options(workdir, capsys, options, message):
    fails_with(capsys, workdir, ["train", "--out", "weights", *options], message)


def test_train_refuses_a_file_as_output_folder(workdir, capsys):
    (workdir / "weights").write_text("not a folder")
    fails_with(capsys, workdir, ["train", "--out", "weights"], "--out: expected a folder, got the file weights")


def test_digits_train_refuses_zero_steps(tmp_path):
    with pytest.raises(ValueError, match="unet_steps must be a positive integer"):
        digits.train(tmp_path / "w", unet_steps=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, message",
    [
        (["--scales", "1", "nan"], "--scales: expected a finite number from 0 to 3.403e+38, got nan"),
        (
            ["--model", "digits-transformer", "--steps", "1001"],
            "--steps: expected an integer from 1 to 1000 for the flow path of --model digits-transformer",
        ),
        (["--samples-per-scale", "5"], "--samples-per-scale: expected an integer between 11 and 20,000, got 5"),
        # one batch a row: 200,000 would need about 40 GB (it was allowed up to ten million)
        (["--samples-per-scale", "200000"], "--samples-per-scale: expected an integer between 11 and 20,000"),
        (["--steps", "1001"], "--steps: expected an integer from 1 to 1000"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to"),
        (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
        (["--plot", "x.xyz"], "--plot: expected a file name ending in ."),
        (["--table", "missing/t.md"], "--table: folder"),
        # the plot replaced the table without a word
        (["--table", "same.png", "--plot", "same.png"], "--table: is the --plot file 'same.png'"),
        (
            ["--model", "digits-transformer", "--sampler", "ddpm"],
            "--sampler: expected one of ddim, euler, heun, dpm++2m, dpm++2s, dpm++3m, unipc, euler-maruyama "
            "for the flow path of --model digits-transformer, got ddpm",
        ),
        (["--sampler", "euler-maruyama"], "--sampler: expected one of ddim, ddpm"),
        (["--guidances", "cfg", "--auto-scales", "1.5"], "--auto-scales: applies to the auto rows"),
        (["--guidances", "cfg", "--cfgpp-scales", "0.3"], "--cfgpp-scales: applies to the cfg++ rows"),
        (["--guidances", "cfg", "--schedule", "cosine"], "--schedule: applies to the schedule rows"),
        (["--guidances", "cfg", "--interval", "0.1", "3"], "--interval: applies to the interval rows"),
        (["--guidances", "cfg++", "--scales", "1", "2"], "--scales: no row of --guidances cfg++ reads it"),
        (["--checkpoint", "missing"], "--checkpoint: missing does not exist"),
        # checked before any row runs, as sample checks --scale (it failed mid-sweep)
        (["--guidances", "cfg", "schedule", "--scales", "1", "3e38"], "--scales: --schedule linear peaks at"),
    ],
)
def test_sweep_refuses_bad_options(workdir, capsys, options, message):
    fails_with(capsys, workdir, ["sweep", "--quiet", *options], message)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_selfcheck_refuses_bad_options(workdir, capsys, options, message):
    from fastguide.apps import selfcheck

    fails_with(capsys, workdir, ["selfcheck", *options], message)
    with pytest.raises(SystemExit) as exit_:
        selfcheck.main(options)  # python -m fastguide.apps.selfcheck: the same checks
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Atomic outputs: a run that fails after its checks leaves no partial file behind.


def test_failed_sample_leaves_no_file(workdir, monkeypatch):
    (workdir / "x.png").write_bytes(b"the previous grid")

    def broken_save(images, path, columns):
        path.write_bytes(b"half a PNG")
        raise OSError("disk full")

    monkeypatch.setattr(cli, "generate", _fake_generate([]))
    monkeypatch.setattr(cli, "save_grid", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli.main([*SAMPLE, "--npz", "x.npz"])
    # the grid as it was (no partial file); the .npz, written first, holds the samples
    assert sorted(p.name for p in workdir.iterdir()) == ["x.npz", "x.png"]
    assert (workdir / "x.png").read_bytes() == b"the previous grid"
    assert (workdir / "x.png").read_bytes() == b"the previous grid"


def test_failed_sampling_writes_nothing(workdir, monkeypatch):
    def broken_generate(model, labels, **options):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cli, "generate", broken_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main([*SAMPLE, "--npz", "x.npz"])
    assert list(workdir.iterdir()) == []


def test_npz_name_without_suffix_gets_npz_appended(workdir, monkeypatch):
    monkeypatch.setattr(cli, "generate", _fake_generate([]))
    assert cli.main([*SAMPLE, "--num-samples", "3", "--npz", "samples"]) == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["samples.npz", "x.png"]
    assert np.load(workdir / "samples.npz")["arr_1"].tolist() == [0, 1, 2]


def test_npz_alone_writes_no_grid_and_comes_first(workdir, monkeypatch):
    """An .npz run (an FID batch) writes no grid unless --out asks for one; with both, the
    samples are on disk before the grid is drawn."""
    monkeypatch.setattr(cli, "generate", _fake_generate([]))
    assert cli.main(["sample", "--quiet", "--num-samples", "3", "--npz", "samples.npz"]) == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["samples.npz"]

    def no_grid(*args, **kwargs):
        raise OSError("the grid failed")

    monkeypatch.setattr(cli, "save_grid", no_grid)
    with pytest.raises(OSError, match="the grid failed"):
        cli.main([*SAMPLE, "--num-samples", "3", "--npz", "more.npz"])
    assert (workdir / "more.npz").is_file() and not (workdir / "x.png").exists()


def test_a_long_output_name_is_written(workdir, monkeypatch):
    monkeypatch.setattr(cli, "generate", _fake_generate([]))
    name = "d" * 246 + ".png"  # 250 bytes: the scratch name beside it must stay within 255
    assert cli.main(["sample", "--quiet", "--num-samples", "2", "--out", name]) == 0
    assert sorted(p.name for p in workdir.iterdir()) == [name]


def test_train_moves_finished_files_into_place(workdir, monkeypatch):
    progress = []

    def fake_train(out, **options):
        progress.append(options["progress"])
        (out / "digits_unet.safetensors").write_bytes(b"weights")
        if options["unet_steps"] == 1:
            raise RuntimeError("interrupted mid-training")
        return {"seed": options["seed"]}

    monkeypatch.setattr(digits, "train", fake_train)
    monkeypatch.setattr(cli, "check_modules", lambda *names: None)  # scikit-learn is not needed by the fake
    with pytest.raises(RuntimeError):
        cli.main(["train", "--out", "new/weights", "--unet-steps", "1"])
    assert list(workdir.iterdir()) == []
    assert cli.main(["train", "--out", "new/weights", "--quiet"]) == 0
    assert progress == [True, False]  # --quiet turns the progress bars off
    assert [p.relative_to(workdir).as_posix() for p in sorted(workdir.rglob("*"))] == [
        "new",
        "new/weights",
        "new/weights/digits_unet.safetensors",
    ]


@pytest.mark.parametrize(
    "options",
    [
        ["--guidance", "classifier"],
        ["--guidance", "both", "--precision", "bf16"],
        ["--guidance", "none", "--sampler", "ddpm"],
        ["--model", "digits-transformer", "--precision", "bf16"],
    ],
)
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
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "fastguide",
            *options,
            "--npz",
            str(merged),
            "--out",
            str(tmp_path / "b.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},  # loopback only, whatever the hostname resolves to
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = np.load(single), np.load(merged)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_world_size_without_torchrun_is_a_usage_error(monkeypatch):
    # WORLD_SIZE inherited outside a torchrun job: the env:// rendezvous finds no RANK and
    # raises a ValueError, which is the same usage error as ranks that never meet.
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(cli.UsageError, match="WORLD_SIZE: is 2 in the environment, but the ranks did not meet.*RANK"):
        cli._distributed(torch.device("cpu"))


def test_torchrun_ranks_join_briefly_and_gather_without_a_deadline(monkeypatch):
    # Under torchrun the ranks exchange only the finished uint8 samples: one gloo group (an
    # NCCL gather_object stages every rank's share on rank 0's GPU); the join times out in
    # minutes (a process that inherited WORLD_SIZE waited forever), and the gather group
    # waits days (a rank with fewer batches sits in the gather for rank 0's last batch:
    # NCCL's default 10 minutes lost a long run's samples).
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("group", kw)) or "group")
    assert cli._distributed(torch.device("cpu")) == (1, 2, torch.device("cpu"), "group")
    (_, backend, join), (_, gather) = calls
    assert backend == "gloo" and gather["backend"] == "gloo"
    assert join["timeout"] <= datetime.timedelta(minutes=10) <= datetime.timedelta(days=1) <= gather["timeout"]

    def no_peers(backend, **kw):
        raise dist.DistStoreError("Timed out after 300 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(dist, "init_process_group", no_peers)
    with pytest.raises(cli.UsageError, match="WORLD_SIZE: is 2 in the environment, but the ranks did not meet"):
        cli._distributed(torch.device("cpu"))

    def gloo_failed(backend, **kw):  # another failure keeps its own message
        raise RuntimeError("Gloo connectFullMesh failed")

    monkeypatch.setattr(dist, "init_process_group", gloo_failed)
    with pytest.raises(RuntimeError, match="connectFullMesh"):
        cli._distributed(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(cli.UsageError, match=r"--device: under torchrun rank 3 .* 2 CUDA device\(s\) are visible"):
        cli._distributed(torch.device("cuda"))


@pytest.mark.parametrize("command", ["sweep", "train", "bench", "selfcheck"])
def test_one_process_commands_refuse_torchrun(command, monkeypatch, capsys, tmp_path):
    # Only sample splits its work over ranks; under torchrun the others repeated it all.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    fails_with(capsys, tmp_path, [command], f"{command}: runs in one process, but WORLD_SIZE is 2")
    monkeypatch.setenv("WORLD_SIZE", "two")  # (int() raised its own ValueError)
    fails_with(capsys, tmp_path, [command], "WORLD_SIZE: must be a positive integer (torchrun sets it), got 'two'")


@pytest.mark.slow
def test_sweep_shows_guidance_raising_accuracy():
    from fastguide.apps import sweep

    rows = sweep.run([0.0, 4.0], samples_per_scale=60, steps=10, progress=False)
    by = {(r["guidance"], r["scale"]): r for r in rows}
    assert by[("cfg", 4.0)]["accuracy"] > by[("cfg", 0.0)]["accuracy"]
    assert by[("classifier", 4.0)]["accuracy"] > by[("classifier", 0.0)]["accuracy"]


def test_sweep_refuses_networks_trained_on_different_splits(workdir, capsys):
    import json
    import shutil

    folder = workdir / "weights"
    shutil.copytree(digits.WEIGHTS, folder)
    record = json.loads((folder / "digits_training.json").read_text())
    (folder / "digits_training.json").write_text(json.dumps({**record, "guide_seed": 7}))
    message = "--checkpoint: the networks in weights were trained on different train/held-out splits"
    fails_with(capsys, workdir, ["sweep", "--quiet", "--checkpoint", "weights", "--guidances", "auto"], message)
    assert digits.held_out_seed(folder) == record["seed"]  # the guide unused: its seed does not matter


@pytest.mark.parametrize(
    "broken, message",
    [
        ("digits_unet.safetensors", "--checkpoint: checkpoint file weights/digits_unet.safetensors"),
        ("digits_training.json", "--checkpoint: weights/digits_training.json must hold a JSON object"),
        ("seed", "--checkpoint: weights/digits_training.json's 'seed' must be an int"),
    ],
)
def test_sweep_reports_a_broken_checkpoint_folder_in_one_line(workdir, capsys, broken, message):
    # as sample does: before any sampling, exit 2, the option named
    import json
    import shutil

    folder = workdir / "weights"
    shutil.copytree(digits.WEIGHTS, folder)
    if broken == "digits_unet.safetensors":
        (folder / broken).write_bytes((folder / broken).read_bytes()[:1000])
    elif broken == "digits_training.json":
        (folder / broken).write_text(json.dumps("seed"))
    else:
        (folder / "digits_training.json").write_text(json.dumps({"seed": "abc"}))
    fails_with(capsys, workdir, ["sweep", "--quiet", "--checkpoint", "weights", "--guidances", "cfg"], message)


def test_a_sweep_scores_against_the_held_out_images_of_the_training_seed(monkeypatch, tmp_path):
    import json
    import shutil

    from fastguide.apps import sweep

    folder = tmp_path / "weights"
    shutil.copytree(digits.WEIGHTS, folder)
    record = json.loads((folder / "digits_training.json").read_text())
    (folder / "digits_training.json").write_text(
        json.dumps({**record, "seed": 7, "guide_seed": 7, "transformer_seed": 7})
    )
    seeds = []
    load_dataset = digits.load_dataset
    monkeypatch.setattr(digits, "load_dataset", lambda seed=0: seeds.append(seed) or load_dataset(seed))
    sweep.run([0.0], kinds=("cfg",), samples_per_scale=11, steps=2, progress=False, weights=folder)
    assert seeds == [7]


@pytest.mark.parametrize(
    "arguments, match",
    [
        (dict(kinds=("cfg", "bogus")), r"kinds must be among .* got \['bogus'\]"),
        (dict(samples_per_scale=5), "samples_per_scale must be at least 11, got 5"),
    ],
)
def test_sweep_run_checks_its_arguments_before_sampling(arguments, match):
    from fastguide.apps import sweep

    with pytest.raises(ValueError, match=match):
        sweep.run([1.0], progress=False, **arguments)


def test_frechet_distance_matches_scipys_matrix_square_root():
    # covariances that do not commute: an eigenvalue pairing that ignores orientation
    # agrees with the formula only when they do
    from scipy import linalg

    from fastguide.apps.sweep import frechet_distance

    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    b[3, 2] = np.inf  # samples that overflowed: NaN, not numpy's LinAlgError
    assert np.isnan(frechet_distance(a, b))


def test_frechet_distance_of_known_gaussians():
    from fastguide.apps.sweep import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(0, 2, (20000, 3)) + np.array([1.0, 0, 0])
    # ‖μ‖² + tr(I + 4I − 2·2I) = 1 + 3·(1 + 4 − 4) = 4
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.15)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_within_class_diversity_averages_the_classes_with_a_pair():
    from fastguide.apps.sweep import within_class_diversity

    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [9.0, 9.0]])
    # class 0: one pair at distance 5; class 1: one member, no pair; class 2: one member
    assert within_class_diversity(features, torch.tensor([0, 0, 1, 2])) == pytest.approx(5.0)
    # no class with two members (fewer samples than a study's classes): NaN, not a crash
    assert math.isnan(within_class_diversity(features, torch.tensor([0, 1, 2, 3])))


def test_guidance_options_reach_the_sampler(workdir, monkeypatch):
    from fastguide import CFG, CFGPlusPlus

    seen, samplers = [], []

    def generate(model, labels, **options):
        samplers.append(options["sampler"])
        seen.append(
            cli._guidance(
                options["guidance_kind"], options["scale"], options["classifier_scale"], model, options["cfg_options"]
            )
        )
        return {0: torch.zeros(len(labels), *model.shape)}

    monkeypatch.setattr(cli, "generate", generate)
    assert cli.main([*SAMPLE, "--schedule", "cosine", "--interval", "0.2", "5", "--tangential"]) == 0
    assert cli.main([*SAMPLE, "--guidance", "cfg++", "--scale", "0.6", "--sampler", "euler"]) == 0
    assert seen[0] == (CFG(2.0, interval=(0.2, 5.0), tangential=True, schedule="cosine"),)
    assert seen[1] == (CFGPlusPlus(0.6, schedule="constant"),)
    # --guidance cfg++ alone runs: λ and the sampler default to ones CFG++ takes
    assert cli.main([*SAMPLE, "--guidance", "cfg++"]) == 0
    assert seen[2] == (CFGPlusPlus(cli.CFG_PLUS_PLUS_SCALE, schedule="constant"),)
    assert cli.main([*SAMPLE, "--guidance", "cfg++", "--interval", "0.3", "5"]) == 0
    assert samplers == ["unipc", "euler", "dpm++2m", "ddim"]


@pytest.mark.parametrize(
    "model, scale", [("adm64", 1.0), ("adm128", 0.5), ("adm256-uncond", 10.0), ("adm512", 4.0), ("digits", 4.0)]
)
def test_the_default_classifier_scale_is_each_releases_own(model, scale):
    # guided-diffusion's README samples each release at its own scale (1, 0.5, 1, 10, 4)
    args = cli.build_parser().parse_args(["sample", "--model", model, "--guidance", "classifier"])
    cli._guidance_defaults(args)
    assert args.classifier_scale == scale


@pytest.mark.parametrize("precision, convolutions", [("fp32", {torch.float32}), ("fp16", {torch.float16})])
def test_adm_models_take_the_precision_asked_for(precision, convolutions, monkeypatch):
    # The presets hold the releases' use_fp16=True; --precision fp32 must still give fp32
    # convolutions, and fp16 the UNet's alone: the classifier stays fp32, as guided-diffusion's
    # README samples it beside an fp16 UNet (built on the meta device, no checkpoint loaded).
    import fastguide.models.checkpoints as checkpoints
    import fastguide.models.configs as configs

    build_model, build_classifier = configs.create_model, configs.create_classifier

    def on_meta(build):
        def built(**flags):
            with torch.device("meta"):
                return build(**flags)

        return built

    monkeypatch.setattr(configs, "create_model", on_meta(build_model))
    monkeypatch.setattr(configs, "create_classifier", on_meta(build_classifier))
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda module, path, **kwargs: module)
    bundle = cli.load_sampling_model("adm64", "model.pt", "classifier.pt", torch.device("meta"), precision)
    for network, expected in ((bundle.unet, convolutions), (bundle.classifier, {torch.float32})):
        kernels = {
            p.dtype for name, p in network.named_parameters() if name.startswith("input_blocks") and p.dim() == 4
        }
        assert kernels == expected  # (ADM's fp16 keeps its norms in fp32)


def test_an_unconditional_adm_model_reads_labels_through_its_classifier_only(workdir, monkeypatch, capsys):
    # --model adm256-uncond (256x256_diffusion_uncond.pt): unguided, no labels reach the
    # model and the .npz holds images only, as ADM writes it; with the classifier, the
    # labels are the classifier's (a tiny pair stands in for the released networks)
    from tests.helpers import tiny_classifier, tiny_unet

    bundle = cli.SamplingModel(tiny_unet(), tiny_classifier(), (3, 8, 8), 1000, cli.model_schedule("adm256-uncond"))
    monkeypatch.setattr(cli, "load_sampling_model", lambda *args: bundle)
    for name in ("model.pt", "classifier.pt"):
        fastguide.save_state_dict(torch.nn.Linear(1, 1), workdir / name)
    run = ["sample", "--model", "adm256-uncond", "--checkpoint", "model.pt", "--quiet", "--steps", "3"]
    run += ["--num-samples", "4", "--batch-size", "4", "--sampler", "ddim"]
    assert cli.main([*run, "--guidance", "none", "--npz", "uncond.npz"]) == 0
    assert list(np.load("uncond.npz")) == ["arr_0"] and np.load("uncond.npz")["arr_0"].shape == (4, 8, 8, 3)
    guided = ["--guidance", "classifier", "--classifier-checkpoint", "classifier.pt", "--labels", "0-3"]
    assert cli.main([*run, *guided, "--npz", "guided.npz"]) == 0
    assert np.load("guided.npz")["arr_1"].tolist() == [0, 1, 2, 3]
    fails_with(
        capsys,
        workdir,
        [*run, "--guidance", "none", "--labels", "3"],
        "--labels: --model adm256-uncond is unconditional: labels apply with --guidance classifier only",
    )


def test_output_into_a_reader_that_stops_early_ends_quietly():
    # `fastguide selfcheck | head -1`: the next line written after the reader has gone
    # raised BrokenPipeError and printed its traceback; a Unix tool ends quietly (141).
    process = subprocess.Popen(
        [sys.executable, "-m", "fastguide", "selfcheck"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout.readline().startswith(b"fastguide self-check")
    process.stdout.close()  # as head does after its line
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 141, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr


@pytest.mark.parametrize(
    ("command", "files"),
    [
        (["sample", "--steps", "2", "--num-samples", "2", "--npz", "s.npz", "--out", "s.png"], ["s.npz", "s.png"]),
        (
            ["sweep", "--scales", "0", "1", "--samples-per-scale", "11", "--steps", "1", "--guidances", "cfg"]
            + ["--plot", "p.png", "--table", "t.md"],
            ["p.png", "t.md"],
        ),
    ],
    ids=["sample", "sweep"],
)
def test_a_reader_that_stops_early_does_not_cost_the_files(tmp_path, command, files):
    # `fastguide sweep ... | head -1` printed the table before writing the table and the
    # plot, so the reader's end stopped the command before either was written.
    process = subprocess.Popen(
        [sys.executable, "-m", "fastguide", *command, "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # the reader is gone before the first line
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 141, stderr.decode()[-2000:]
    assert all((tmp_path / name).is_file() for name in files), sorted(p.name for p in tmp_path.iterdir())


LONG = "a" * 300  # past a file name's 255 bytes


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["sample", "--out", LONG + ".png"], "--out"),
        (["sample", "--npz", "b" * 252], "--npz"),  # 256 bytes once np.savez appends .npz
        (["sample", "--checkpoint", LONG], "--checkpoint"),
        (["train", "--out", LONG], "--out"),
        (["bench", "--out", LONG + "/results"], "--out"),
    ],
    ids=["sample-out", "npz", "checkpoint", "train-out", "bench-out"],
)
def test_a_file_name_past_its_length_limit_is_one_line(workdir, capsys, argv, option):
    # the file system's ENAMETOOLONG escaped the checks as an OSError traceback
    fails_with(capsys, workdir, argv, f"{option}: cannot use", "File name too long")


def test_train_only_keeps_the_folders_split(workdir, capsys, monkeypatch):
    # Without --seed, --only guide took seed 0 whatever the folder's networks were trained
    # with: the guide then trained on another train/held-out split, a folder the sweep
    # refused only later. Another --seed stays allowed (a guide of its own), with a note.
    import json

    folder = workdir / "weights"
    folder.mkdir()
    (folder / "digits_training.json").write_text(json.dumps({"seed": 3, "unet_steps": 10}))
    monkeypatch.setattr(cli, "check_modules", lambda *names: None)
    seeds = []

    def fake_train_guide(out, seed, **options):
        seeds.append(seed)
        return {"seed": 3, "guide_seed": seed}

    monkeypatch.setattr(digits, "train_guide", fake_train_guide)
    assert cli.main(["train", "--only", "guide", "--out", "weights", "--quiet"]) == 0
    assert cli.main(["train", "--only", "guide", "--seed", "3", "--out", "weights", "--quiet"]) == 0
    assert "note" not in capsys.readouterr().err
    assert cli.main(["train", "--only", "guide", "--seed", "5", "--out", "weights", "--quiet"]) == 0
    assert "--seed 5 draws another train/held-out split" in capsys.readouterr().err
    assert seeds == [3, 3, 5]


def test_train_only_takes_the_other_networks_seed_where_the_record_has_no_main_seed(workdir, monkeypatch):
    # A folder holding a guide alone (a record with guide_seed, no "seed"): --only transformer
    # took seed 0, another split than the guide's
    import json

    folder = workdir / "weights"
    folder.mkdir()
    (folder / "digits_training.json").write_text(json.dumps({"guide_seed": 4, "guide_steps": 10}))
    monkeypatch.setattr(cli, "check_modules", lambda *names: None)
    seeds = []

    def fake_train_transformer(out, seed, **options):
        seeds.append(seed)
        return {"guide_seed": 4, "transformer_seed": seed}

    monkeypatch.setattr(digits, "train_transformer", fake_train_transformer)
    assert cli.main(["train", "--only", "transformer", "--out", "weights", "--quiet"]) == 0
    assert seeds == [4]


@pytest.mark.parametrize("rank", ["3", "2", "-1", "x"])
def test_a_rank_outside_the_world_is_one_line(rank, monkeypatch, capsys, tmp_path):
    # RANK 3 of WORLD_SIZE 2 waited out the rendezvous's whole timeout for ranks that never come
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    fails_with(capsys, tmp_path, ["sample"], f"RANK: must be an integer from 0 to 1 (WORLD_SIZE 2), got '{rank}'")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # 5000 digits are a 364×18004 grid: Pillow's WebP encoder refused it after sampling
        (["--num-samples", "5000", "--out", "a.webp"], "--out: the grid would be 364×18004 pixels, past WEBP's 16383"),
        # Pillow resized the grid to an icon's size without a word
        (["--out", "a.ico"], "--out: 'a.ico' is an icon format"),
        (["--num-samples", "20000", "--out", "a.tga"], "--out: the grid would be 364×72004 pixels, past TGA's 65535"),
    ],
)
def test_a_grid_the_image_format_cannot_hold_is_refused_before_sampling(workdir, capsys, argv, message):
    fails_with(capsys, workdir, ["sample", "--quiet", *argv], message)


def test_the_grid_size_check_is_the_grid_save_grid_writes(tmp_path):
    pixels = np.zeros((23, 8, 8, 1), dtype=np.uint8)
    cli.save_grid(pixels, tmp_path / "g.png", columns=10)
    assert Image.open(tmp_path / "g.png").size == cli.grid_pixels(23, 8, 8, 10, cli.grid_scale(8, 8))


def test_buffered_output_into_a_reader_that_has_gone_ends_quietly():
    # stdout to a pipe is block-buffered: --help's text went out at Python's exit flush,
    # after main had returned, as "Exception ignored ... BrokenPipeError" and status 120.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fastguide", "sample", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 141 and b"BrokenPipeError" not in stderr, stderr.decode()[-2000:]


def test_a_broken_pipe_that_is_not_stdouts_is_reported(monkeypatch):
    # (a subprocess's or a socket's: only stdout's reader going away ends the command quietly)
    def broken(argv):
        raise BrokenPipeError("a subprocess's pipe")

    monkeypatch.setattr(cli, "_run_command", broken)
    monkeypatch.setattr(cli, "_stdout_reader_gone", lambda: False)
    with pytest.raises(BrokenPipeError, match="a subprocess's pipe"):
        cli.main(["selfcheck"])


def test_the_npz_is_reported_when_the_grid_then_fails(workdir, capsys, monkeypatch):
    def broken_save_grid(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "save_grid", broken_save_grid)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["sample", "--quiet", "--steps", "1", "--num-samples", "2", "--npz", "s.npz", "--out", "s.png"])
    assert "wrote s.npz" in capsys.readouterr().out and (workdir / "s.npz").is_file()
