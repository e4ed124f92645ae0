"""``fastguide sample --pipeline DIR --prompt ...`` on a tiny Stable Diffusion pipeline saved
to a folder (random weights, a character-level CLIP tokenizer written here: no downloads)."""

from __future__ import annotations

import json
import string

import pytest
import torch

from fastguide.apps.cli import main

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:  # each letter a token, inside a word and at its end
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=32,
    )
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.mark.parametrize(
    "extra",
    [[], ["--pag-scale", "2.0"], ["--sampler", "unipc", "--spacing", "logsnr"]],
    ids=["cfg", "pag", "own-sampler"],
)
def test_sample_from_a_saved_pipeline_writes_a_png(pipeline_folder, tmp_path, capsys, extra):
    from PIL import Image

    out = tmp_path / "prompt.png"
    code = main(
        [
            "sample",
            "--pipeline",
            str(pipeline_folder),
            "--prompt",
            "a cat",
            "--negative-prompt",
            "blurry",
            "--steps",
            "3",
            "--num-samples",
            "3",
            "--batch-size",
            "2",
            "--scale",
            "5",
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0 and "wrote 3 samples" in printed and "own loop ran" not in printed  # fastguide's loop ran
    # --quiet: no bar, the loading ones of diffusers and transformers neither (then back on)
    assert "it/s" not in captured.err and "%|" not in captured.err
    assert diffusers.utils.logging.is_progress_bar_enabled()
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.size == (3 * 17 + 1, 17 + 1)  # three 16×16 tiles in a row, 1-pixel gaps


def test_a_grid_that_fails_to_write_leaves_the_old_file(pipeline_folder, tmp_path, monkeypatch):
    # The grid is written beside --out and moved over it: a write that dies midway leaves
    # the previous file as it was and no scratch file behind.
    from fastguide.apps import cli

    out = tmp_path / "prompt.png"
    out.write_bytes(b"previous")

    def broken_save_grid(images, path, columns, scale=4):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cli, "save_grid", broken_save_grid)
    arguments = ["sample", "--pipeline", str(pipeline_folder), "--prompt", "a cat", "--steps", "2"]
    with pytest.raises(OSError, match="disk full"):
        main([*arguments, "--num-samples", "1", "--out", str(out), "--quiet"])
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["prompt.png"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--labels", "3"], "--labels: applies to the digits and ADM models, not to --pipeline"),
        ([], "--prompt: is required with --pipeline"),
        (["--prompt", "x", "--spacing", "karras"], "--spacing: places fastguide's own sampler's steps"),
        (["--prompt", "x", "--sampler", "unipc", "--spacing", "adm"], "--spacing: adm (ADM's strided ddimN grid)"),
        (["--prompt", "x", "--steps", "0"], "--steps"),
        (["--prompt", "x", "--scale", "1e39"], "--scale: expected a finite number from 0 to"),
        # diffusers guides only above 1: below it the conditional model alone, and no negative prompt
        (["--prompt", "x", "--scale", "0"], "--scale: a diffusers pipeline guides only with a scale above 1"),
        (["--prompt", "x", "--scale", "1", "--negative-prompt", "y"], "--negative-prompt: is the unconditional"),
        (["--prompt", "x", "--seed", str(2**64 - 1), "--num-samples", "2", "--batch-size", "1"], "--seed: expected"),
        (["--prompt", "x", "--backend", "cuda"], "--backend: the cuda backend cannot run on cpu"),
        # a flow sampler for SD's variance-preserving scheduler: refused before the pipeline loads
        (["--prompt", "x", "--sampler", "euler-maruyama"], "--sampler: "),
    ],
)
def test_bad_pipeline_options_exit_2_with_one_line(pipeline_folder, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(pipeline_folder), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_a_pipeline_under_torchrun_is_refused(pipeline_folder, capsys, monkeypatch):
    # every rank would sample every image and write the same files
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(pipeline_folder), "--prompt", "x"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--pipeline: runs in one process: under torchrun" in error


def test_a_pipeline_class_this_diffusers_lacks_is_one_line(pipeline_folder, tmp_path, capsys):
    import json
    import shutil

    folder = tmp_path / "newer"
    shutil.copytree(pipeline_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PipelineOfANewerDiffusers"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(folder), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "--pipeline: could not load the pipeline" in error
    assert len(error.splitlines()) == 1


def test_a_missing_diffusers_is_named(pipeline_folder, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(pipeline_folder), "--prompt", "x"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "--pipeline: needs diffusers: pip install 'fastguide[diffusers]'" in error


def test_a_folder_without_a_pipeline_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(tmp_path), "--prompt", "x"])
    assert exit_info.value.code == 2 and "--pipeline: expected a folder written by" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt", "--pag-scale"])
def test_pipeline_options_without_a_pipeline_are_refused(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", flag, "3", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and f"{flag}: applies to --pipeline only" in capsys.readouterr().err


def test_a_pndm_pipeline_below_its_runge_kutta_steps_is_refused(pipeline_folder, tmp_path, capsys):
    # diffusers' PNDMScheduler with its Runge-Kutta start fails in set_timesteps below 4
    # steps (a NumPy broadcast error from inside diffusers' fallback loop).
    import json
    import shutil

    folder = tmp_path / "pndm"
    shutil.copytree(pipeline_folder, folder)
    diffusers.PNDMScheduler(beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(folder), "--prompt", "x", "--steps", "3", "--out", str(tmp_path / "x.png")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(error.splitlines()) == 1
    assert "--steps: the pipeline's PNDMScheduler starts with Runge–Kutta steps" in error
    out = tmp_path / "four.png"
    assert main(["sample", "--pipeline", str(folder), "--prompt", "x", "--steps", "4", "--out", str(out)]) == 0
    assert out.is_file()


def test_a_model_index_without_its_class_name_is_one_line(pipeline_folder, tmp_path, capsys):
    # diffusers' KeyError('_class_name') escaped as a traceback
    import json
    import shutil

    folder = tmp_path / "nameless"
    shutil.copytree(pipeline_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "_class_name"}))
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--pipeline", str(folder), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "--pipeline: could not load the pipeline" in error
    assert len(error.splitlines()) == 1
