"""The digits model's autoguidance guide network (``fastguide train --only guide``,
``fastguide sample --guidance auto``) and the sweep's kinds of guidance."""

import json
import shutil

import pytest
import torch

from fastguide import AutoGuidance
from fastguide.apps import cli, digits, sweep
from tests.helpers import fails_with

pytestmark = pytest.mark.skipif(not digits.guide_file().is_file(), reason="the digits guide weights are not built")
SMALL = ["--num-samples", "12", "--steps", "6", "--batch-size", "4", "--quiet"]
NETWORKS = ("unet", "classifier", "evaluator")


def test_shipped_guide_is_a_smaller_version_of_the_model():
    models = digits.load()
    size = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert isinstance(models.guide, type(models.unet)) and size(models.guide) < size(models.unet) / 2
    assert (models.guide.num_classes, models.guide.null_label) == (models.unet.num_classes, models.unet.null_label)
    record = json.loads((digits.WEIGHTS / "digits_training.json").read_text())
    assert record["guide_steps"] < 3000 and record["guide_loss"] > record["unet_loss"]


def _shipped_copy(folder):
    folder.mkdir()
    for name in (*NETWORKS, "training"):
        suffix = "json" if name == "training" else "safetensors"
        shutil.copy(digits.WEIGHTS / f"digits_{name}.{suffix}", folder)
    return folder


def test_train_only_guide_keeps_the_other_networks_and_their_record(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "check_modules", lambda *names: None)
    out = _shipped_copy(tmp_path / "weights")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    old_record = json.loads(before["digits_training.json"])
    assert cli.main(["train", "--only", "guide", "--out", str(out), "--guide-steps", "3", "--seed", "5"]) == 0
    for name in NETWORKS:
        assert (out / f"digits_{name}.safetensors").read_bytes() == before[f"digits_{name}.safetensors"]
    record = json.loads((out / "digits_training.json").read_text())
    old_entries = {k: v for k, v in old_record.items() if not k.startswith("guide_")}
    assert {k: record[k] for k in old_entries} == old_entries  # the other networks' entries, unchanged
    assert (record["guide_seed"], record["guide_steps"]) == (5, 3) and record["guide_loss"] > 0
    first = digits.guide_file(out).read_bytes()
    assert cli.main(["train", "--only", "guide", "--out", str(out), "--guide-steps", "3", "--seed", "5"]) == 0
    assert digits.guide_file(out).read_bytes() == first  # deterministic from its seed
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "digits_guide.safetensors"])


def test_guide_is_the_same_trained_alone_or_after_the_others(tmp_path):
    digits.train(
        tmp_path / "all",
        unet_steps=2,
        classifier_steps=2,
        evaluator_steps=2,
        guide_steps=3,
        transformer_steps=2,
        progress=False,
    )
    alone = digits.train_guide(tmp_path / "alone", steps=3, progress=False)
    assert digits.guide_file(tmp_path / "all").read_bytes() == digits.guide_file(tmp_path / "alone").read_bytes()
    assert json.loads((tmp_path / "all" / "digits_training.json").read_text())["guide_loss"] == alone["guide_loss"]
    other_seed = digits.train_guide(tmp_path / "other", seed=1, steps=3, progress=False)
    assert other_seed["guide_loss"] != alone["guide_loss"]


def test_train_only_guide_refuses_a_broken_record(workdir, capsys):

    (workdir / "weights").mkdir()
    (workdir / "weights" / "digits_training.json").write_text("[1, 2]")
    fails_with(
        capsys,
        workdir,
        ["train", "--only", "guide", "--out", "weights"],
        "--out: expected weights/digits_training.json to hold a JSON object, got list",
    )
    fails_with(capsys, workdir, ["train", "--only", "unet", "--out", "weights"], "--only: invalid choice: 'unet'")
    fails_with(
        capsys,
        workdir,
        ["train", "--guide-steps", "0", "--out", "weights"],
        "--guide-steps: expected an integer of at least 1, got 0",
    )


def test_sample_with_autoguidance(tmp_path):
    out = tmp_path / "x.png"
    assert (
        cli.main(["sample", "--guidance", "auto", "--scale", "2", "--interval", "0.3", "5", "--out", str(out), *SMALL])
        == 0
    )
    assert out.is_file()


def test_auto_options_reach_the_sampler(workdir, monkeypatch):
    seen = []

    def generate(model, labels, **options):
        seen.append(
            cli._guidance(
                options["guidance_kind"], options["scale"], options["classifier_scale"], model, options["cfg_options"]
            )
        )
        return {0: torch.zeros(len(labels), *model.shape)}

    monkeypatch.setattr(cli, "generate", generate)
    sample = ["sample", "--out", "x.png", "--quiet", "--guidance", "auto"]
    assert cli.main([*sample, "--scale", "2.5"]) == 0
    assert cli.main([*sample, "--interval", "0.2", "4"]) == 0
    (first,), (second,) = seen
    assert isinstance(first, AutoGuidance) and (first.scale, first.interval) == (2.5, None)
    assert isinstance(second, AutoGuidance) and (second.scale, second.interval) == (2.0, (0.2, 4.0))
    assert sum(p.numel() for p in first.guide_model.parameters()) < 400_000  # the guide, not the main UNet


def test_auto_refuses_what_it_cannot_do(workdir, capsys):

    sample = ["sample", "--out", "x.png", "--quiet", "--guidance", "auto"]
    fails_with(
        capsys, workdir, [*sample, "--schedule", "cosine"], "--schedule: applies to --guidance cfg or both, not auto"
    )
    fails_with(capsys, workdir, [*sample, "--tangential"], "--tangential: applies to --guidance cfg or both, not auto")
    fails_with(
        capsys,
        workdir,
        [*sample, "--classifier-checkpoint", "c.pt"],
        "--classifier-checkpoint: --guidance auto guides with the weaker guide network, not a classifier",
    )
    (workdir / "m.pt").write_bytes(b"garbage")  # refused before it is read
    fails_with(
        capsys,
        workdir,
        [*sample, "--model", "adm64", "--checkpoint", "m.pt"],
        "--guidance: auto needs a weaker guide network, which only --model digits has",
    )
    fails_with(
        capsys,
        workdir,
        ["sample", "--out", "x.png", "--guidance", "classifier", "--interval", "0.2", "4"],
        "--interval: applies to --guidance cfg, cfg++, both, auto, got --guidance classifier",
    )
    old = _shipped_copy(workdir / "old")
    fails_with(
        capsys,
        workdir,
        [*sample, "--checkpoint", "old"],
        f"--guidance: auto needs the guide network {digits.guide_file(old.relative_to(workdir))}, which is "
        "missing: 'fastguide train --only guide --out old' adds it",
    )
    assert (
        cli.main(["sample", "--out", "x.png", "--quiet", "--checkpoint", "old", "--num-samples", "2", "--steps", "2"])
        == 0
    )  # cfg needs no guide
    assert digits.load(weights=old).guide is None


def test_sweep_rows_of_every_kind():
    variants = sweep.Variants(cfgpp_scales=(0.0, 0.5), auto_scales=(1.0, 2.0), interval=(0.3, 5.0), schedule="cosine")
    rows = sweep.run(
        [0.0, 3.0], kinds=sweep.KINDS, variants=variants, samples_per_scale=20, steps=4, sampler="unipc", progress=False
    )
    assert [(r["kind"], r["scale"]) for r in rows] == [
        ("cfg", 0.0),
        ("cfg", 3.0),
        ("cfg++", 0.0),
        ("cfg++", 0.5),
        ("auto", 1.0),
        ("auto", 2.0),
        ("interval", 0.0),
        ("interval", 3.0),
        ("schedule", 0.0),
        ("schedule", 3.0),
        ("classifier", 0.0),
        ("classifier", 3.0),
    ]
    assert {r["sampler"] for r in rows if r["kind"] == "cfg++"} == {"dpm++2m"}  # CFG++ has no unipc form
    assert {r["sampler"] for r in rows if r["kind"] != "cfg++"} == {"unipc"}
    by = {(r["kind"], r["scale"]): r for r in rows}
    assert by[("auto", 1.0)]["frechet"] != by[("auto", 2.0)]["frechet"]  # the guide's pull changes the samples
    assert by[("cfg", 0.0)]["frechet"] == by[("classifier", 0.0)]["frechet"]  # the same unconditional samples
    assert by[("interval", 0.0)]["frechet"] != by[("cfg", 0.0)]["frechet"]  # conditional outside the interval
    table = sweep.markdown(rows)
    assert "| cfg, σ̃ in (0.3, 5] | unipc | 3 |" in table and "| cfg, cosine schedule | unipc | 0 |" in table
    assert "| cfg++ | dpm++2m | 0.5 |" in table
    assert table.count("**") == 2 * len(sweep.KINDS)  # one bold Fréchet distance per kind
    summary = table.strip().splitlines()[-1]
    best = sweep.best_rows(rows)
    assert summary.startswith("Lowest Fréchet distance: cfg at w = ")
    assert f"auto at w = {best['auto']['scale']:g} ({best['auto']['frechet']:.3f})" in summary
    assert f"classifier at s = {best['classifier']['scale']:g}" in summary


def test_best_rows_pick_the_lowest_frechet_distance_of_each_kind():
    rows = [
        {"kind": k, "frechet": f, "scale": s}
        for k, f, s in [("cfg", 3.0, 0), ("cfg", 1.0, 1), ("cfg", 2.0, 2), ("auto", 5.0, 1), ("auto", 4.0, 2)]
    ]
    best = sweep.best_rows(rows)
    assert list(best) == ["cfg", "auto"]
    assert (best["cfg"]["scale"], best["auto"]["scale"]) == (1, 2)
    # a NaN distance (samples that overflowed at a huge scale) is never the lowest, first or not
    nan = float("nan")
    rows = [{"kind": "cfg", "frechet": f, "scale": s} for f, s in [(nan, 100), (5.0, 1), (nan, 50), (4.0, 2)]]
    assert sweep.best_rows(rows)["cfg"]["scale"] == 2
    assert sweep.best_rows(rows[:1])["cfg"]["scale"] == 100  # every row NaN: the first


def test_sweep_command_options(workdir, capsys, monkeypatch):

    sweep_ = ["sweep", "--quiet"]
    fails_with(
        capsys,
        workdir,
        [*sweep_, "--guidances", "cfg++", "--cfgpp-scales", "0.5", "1.5"],
        "--cfgpp-scales: expected CFG++'s λ values in [0, 1], got 1.5",
    )
    fails_with(capsys, workdir, [*sweep_, "--auto-scales", "-1"], "--auto-scales: expected a finite number from 0 to")
    fails_with(capsys, workdir, [*sweep_, "--interval", "2", "1"], "--interval: expected LOW HIGH with 0 <= LOW < HIGH")
    fails_with(capsys, workdir, [*sweep_, "--guidances", "bogus"], "--guidances: invalid choice: 'bogus'")
    fails_with(capsys, workdir, [*sweep_, "--schedule", "constant"], "--schedule: invalid choice: 'constant'")
    seen = {}

    def run(scales, **options):
        seen.update(options, scales=scales)
        return [
            {
                "kind": "cfg",
                "guidance": "cfg",
                "sampler": "dpm++2m",
                "scale": 1.0,
                "accuracy": 1.0,
                "frechet": 2.0,
                "diversity": 3.0,
            }
        ]

    monkeypatch.setattr(sweep, "run", run)
    monkeypatch.setattr(sweep, "plot", lambda rows, path: path.write_bytes(b"png"))
    assert (
        cli.main(
            [
                *sweep_,
                "--guidances",
                "auto",
                "cfg",
                "auto",
                "schedule",
                "--auto-scales",
                "1.5",
                "2",
                "--schedule",
                "cosine",
                "--table",
                "t.md",
            ]
        )
        == 0
    )
    assert seen["kinds"] == ("auto", "cfg", "schedule") and seen["scales"] == [0, 1, 2, 3, 5, 8]
    assert seen["variants"] == sweep.Variants(auto_scales=(1.5, 2.0), schedule="cosine")
    assert "**2.000**" in (workdir / "t.md").read_text()
    monkeypatch.setattr(digits, "guide_file", lambda weights=None: workdir / "missing.safetensors")
    fails_with(capsys, workdir, [*sweep_, "--guidances", "cfg", "auto"], "--guidances: auto needs the guide network")


def test_cfgpp_rows_keep_a_sampler_cfgpp_is_built_for():
    jobs = sweep._jobs(("cfg++", "cfg"), [2.0], sweep.Variants(cfgpp_scales=(0.5,)), "euler")
    assert [(j["kind"], j["sampler"], j["scale"]) for j in jobs] == [("cfg++", "euler", 0.5), ("cfg", "euler", 2.0)]
    assert sweep._jobs(("cfg++",), [2.0], sweep.Variants(), "heun")[0]["sampler"] == "dpm++2m"
