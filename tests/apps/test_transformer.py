"""The digits' flow-matching transformer: ``fastguide train --only transformer``,
``fastguide sample --model digits-transformer`` and its sweep rows."""

import json
import shutil

import pytest
import torch

from fastguide import CFG, NoiseSchedule, sample
from fastguide.apps import cli, digits, sweep
from fastguide.models.dit import DiT
from tests.helpers import fails_with

SHIPPED = pytest.mark.skipif(not digits.transformer_file().is_file(), reason="the flow transformer is not built")
SMALL = ["--num-samples", "12", "--steps", "5", "--batch-size", "6", "--quiet"]


def _shipped_copy(folder):
    folder.mkdir()
    for name in ("unet", "classifier", "evaluator"):
        shutil.copy(digits.WEIGHTS / f"digits_{name}.safetensors", folder)
    shutil.copy(digits.WEIGHTS / "digits_training.json", folder)
    return folder


def test_train_only_transformer_is_deterministic_and_keeps_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "check_modules", lambda *names: None)
    out = _shipped_copy(tmp_path / "weights")
    old_record = json.loads((out / "digits_training.json").read_text())
    command = ["train", "--only", "transformer", "--out", str(out), "--transformer-steps", "3", "--seed", "2"]
    assert cli.main(command) == 0
    first = digits.transformer_file(out).read_bytes()
    record = json.loads((out / "digits_training.json").read_text())
    kept = {k: v for k, v in old_record.items() if not k.startswith("transformer_")}
    assert {k: record[k] for k in kept} == kept  # the other networks' entries, unchanged
    assert (record["transformer_seed"], record["transformer_steps"]) == (2, 3) and record["transformer_loss"] > 0
    assert cli.main(command) == 0
    assert digits.transformer_file(out).read_bytes() == first
    model = digits.load(weights=out).transformer
    assert isinstance(model, DiT) and model.null_label == digits.NUM_CLASSES and not model.training


def test_flow_loss_regresses_the_velocity_of_the_flow_path():
    run, _, _ = digits._start(seed=0, batch_size=4, progress=False)
    x0 = torch.randn(4, 1, 8, 8)
    seen = {}

    def model(x_sigma, t, y):
        seen.update(x=x_sigma, t=t)
        return torch.zeros_like(x_sigma)

    loss = run.flow_loss(model, x0, torch.arange(4))
    sigma = (seen["t"] / 1000).reshape(-1, 1, 1, 1)
    eps = (seen["x"] - (1 - sigma) * x0) / sigma  # the noise the path mixed in
    torch.testing.assert_close(loss, (eps - x0).square().mean())
    assert 0 < seen["t"].min() and seen["t"].max() < 1000


@SHIPPED
def test_sample_cli_draws_from_the_transformer(workdir):
    assert cli.main(["sample", "--model", "digits-transformer", "--out", "x.png", "--npz", "s", *SMALL]) == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["s.npz", "x.png"]


@SHIPPED
def test_shipped_transformer_follows_its_labels_under_cfg():
    models = digits.load()
    labels = torch.arange(40) % 10
    images = sample(
        models.transformer,
        (40, 1, 8, 8),
        labels=labels,
        steps=10,
        schedule=NoiseSchedule.flow(),
        prediction_type="flow_prediction",
        clip_denoised=True,
        guidance=CFG(3.0),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        accuracy = (models.evaluator(images).argmax(-1) == labels).float().mean().item()
    assert accuracy > 0.8


@pytest.mark.parametrize(
    "options, message",
    [
        (["--guidance", "classifier"], "--guidance: --model digits-transformer has classifier-free guidance only"),
        (["--guidance", "auto"], "--model digits-transformer has classifier-free guidance only"),
        (["--spacing", "karras"], "--spacing: spacing must be 'linspace' for a flow schedule"),
        (["--spacing", "adm"], "--spacing: spacing must be 'linspace' for a flow schedule"),
    ],
)
def test_sample_cli_refuses_what_the_transformer_lacks(capsys, workdir, options, message):
    if not digits.transformer_file().is_file():
        pytest.skip("the flow transformer is not built")
    fails_with(capsys, workdir, ["sample", "--model", "digits-transformer", *SMALL, *options], message)


def test_sample_cli_names_the_missing_transformer(capsys, workdir):
    folder = _shipped_copy(workdir / "weights")
    fails_with(
        capsys,
        workdir,
        ["sample", "--model", "digits-transformer", "--checkpoint", str(folder), *SMALL],
        "'fastguide train --only transformer",
    )


@SHIPPED
def test_sample_cli_takes_a_folder_holding_the_transformer_alone(workdir):
    # what 'fastguide train --only transformer --out DIR' writes: no UNet, classifier or evaluator
    folder = workdir / "only-transformer"
    folder.mkdir()
    shutil.copy(digits.transformer_file(), folder)
    arguments = ["sample", "--model", "digits-transformer", "--checkpoint", str(folder), "--out", "x.png", *SMALL]
    assert cli.main(arguments) == 0 and (workdir / "x.png").is_file()


@SHIPPED
def test_sweep_rows_of_the_transformer():
    rows = sweep.run([0.0, 3.0], kinds=("cfg",), samples_per_scale=20, steps=6, progress=False, transformer=True)
    assert [row["scale"] for row in rows] == [0.0, 3.0]
    assert rows[1]["accuracy"] > rows[0]["accuracy"]
    with pytest.raises(ValueError, match="CFG kinds only"):
        sweep.run([1.0], kinds=("classifier",), samples_per_scale=20, steps=3, progress=False, transformer=True)


def test_every_shipped_network_is_in_the_checkout():
    # The app tests (here, test_cli, test_guide) skip where a network is not built (a user
    # retraining one); in the repository every one ships, so those skips cannot hide a
    # missing file in CI.
    names = {"unet", "classifier", "evaluator", "guide", "transformer"}
    assert all((digits.WEIGHTS / f"digits_{name}.safetensors").is_file() for name in names)
    assert digits.transformer_file() == digits.WEIGHTS / "digits_transformer.safetensors"
    assert digits.guide_file() == digits.WEIGHTS / "digits_guide.safetensors"


@SHIPPED
def test_every_shipped_network_runs_under_bf16_autocast():
    # `fastguide sample --precision bf16` runs each network under CPU/GPU autocast: the fused
    # ops take its mixed dtypes (a float32 residual stream, bfloat16 branches) and every
    # output stays within a few bf16 roundings (2^-8) of the float32 forward.
    models = digits.load()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(10, 1, 8, 8, generator=g), torch.linspace(0, 999, 10).round().long(), torch.arange(10)
    calls = {
        "unet": (models.unet, (x, t, y)),
        "guide": (models.guide, (x, t, y)),
        "classifier": (models.classifier, (x, t)),
        "evaluator": (models.evaluator, (x.clamp(-1, 1),)),
        "transformer": (models.transformer, (x, t.float(), y)),
    }
    for name, (network, inputs) in calls.items():
        with torch.no_grad():
            expected = network(*inputs)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = network(*inputs)
        assert got.dtype == torch.bfloat16, name
        assert (got.float() - expected).abs().max() <= 2**-6 * expected.abs().max(), name
