"""Accuracy per model call: every fastguide solver × spacing against diffusers' schedulers.

    python -m benchmarks.sampling.nfe [--out DIR] [--quick] [--digits-samples N]

On the exact Gaussian-class oracle (benchmarks/sampling/oracle.py), CFG at w = 1.5, 3 and 6,
on ADM's linear VP schedule and on a flow path (shift 1 and 3), each sampler runs from the
same 256 starting points at 5–50 model calls; the error is the largest deviation from the
guided probability-flow ODE solved to 1e-12 from the sampler's own first time. diffusers'
DDIM, DPMSolverMultistep, UniPCMultistep and Heun schedulers (VP; ADM's betas, DDIM without
its default x0 clipping, which the oracle's unclipped ODE would count as error), FlowMatchEuler
and FlowMatchHeun (flow) run in their defaults on the same oracle. The digits part compares
Fréchet distances of the digits model's samples (CFG at 2) between fastguide's default and
diffusers' DPMSolverMultistepScheduler. k-diffusion's samplers (VP, on its Karras grid, ρ = 7,
between the schedule's σ̃ at t = 0 and t = 999) run when it is installed (`pip install --no-deps
k-diffusion torchsde torchdiffeq trampoline`; see ``kdiffusion_sampling``). Writes
DIR/nfe.json, DIR/nfe.md, DIR/nfe.png.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.sampling.oracle import GaussianClasses
from benchmarks.sampling.study import at_least, progress_printer, write_study
from fastguide import CFG, GuidedSampler, NoiseSchedule
from fastguide.sampling.schedule import SPACINGS

BUDGETS = (5, 6, 8, 10, 12, 15, 20, 25, 35, 50)
WEIGHTS = (1.5, 3.0, 6.0)
# sampler name in the table -> (fastguide sampler, solver_order)
SOLVERS = {
    "ddim": ("ddim", None),
    "euler": ("euler", None),
    "heun": ("heun", None),
    "dpm++2m": ("dpm++2m", None),
    "dpm++2s": ("dpm++2s", None),
    "dpm++3m": ("dpm++3m", None),
    "unipc": ("unipc", None),
    "unipc-3": ("unipc", 3),
}
DIFFUSERS_VP = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler")
DIFFUSERS_FLOW = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
ADM_BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
# k-diffusion sampler -> (keyword arguments, model calls per step)
KDIFFUSION = {
    "sample_euler": ({}, 1),
    "sample_heun": ({}, 2),
    "sample_lms": ({}, 1),
    "sample_dpm_2": ({}, 2),
    "sample_dpmpp_2m": ({}, 1),
    "sample_dpmpp_3m_sde": ({"eta": 0.0}, 1),
}


def steps_for(budget: int, calls_per_step: int) -> int:
    """The most steps whose model calls fit the budget (2·steps − 1 for two-call solvers)."""
    return budget if calls_per_step == 1 else (budget + 1) // 2


def fastguide_steps(budget: int, schedule: NoiseSchedule, sampler: str, solver_order: int | None, spacing: str) -> int:
    """The most steps whose model calls, as fastguide's sampler counts them, fit the budget:
    a two-call solver's last step makes one call (2·steps − 1), and dpm++2s's first step
    from a flow path's pure noise makes one too (2·steps − 2 there)."""

    def calls(steps: int) -> int:
        return GuidedSampler(
            lambda x, t: x,
            sampler=sampler,
            solver_order=solver_order,
            steps=steps,
            spacing=spacing,
            schedule=schedule,
            prediction_type="flow_prediction" if schedule.is_flow else "epsilon",
        ).num_calls

    steps = max(1, budget // 2)  # (no solver makes more than 2 calls a step)
    while calls(steps + 1) <= budget:
        steps += 1
    return steps


def fastguide_error(
    oracle: GaussianClasses,
    schedule: NoiseSchedule,
    x_T: torch.Tensor,
    sampler: str,
    solver_order: int | None,
    steps: int,
    spacing: str,
) -> tuple[float, int]:
    prediction_type = "flow_prediction" if schedule.is_flow else "epsilon"
    runner = GuidedSampler(
        oracle.model(schedule, prediction_type),
        sampler=sampler,
        solver_order=solver_order,
        steps=steps,
        spacing=spacing,
        schedule=schedule,
        guidance=CFG(oracle.w),
        clip_denoised=False,
        prediction_type=prediction_type,
        null_label=1,
        num_classes=1,
    )
    got = runner(x_T.shape, labels=torch.zeros(len(x_T), dtype=torch.long), noise=x_T)
    exact = oracle.exact(x_T, schedule, runner.timesteps[0])
    return (got.double() - exact).abs().max().item(), runner.num_calls


def diffusers_error(
    oracle: GaussianClasses, name: str, steps: int, x_T: torch.Tensor, shift: float = 1.0
) -> tuple[float, int]:
    """One diffusers scheduler in its defaults (ADM's betas on VP), driven by the oracle."""
    import diffusers

    flow = name.startswith("FlowMatch")
    # DDIM clips x0 to [-1, 1] by default; the oracle and fastguide's rows do not clip.
    options = dict(shift=shift) if flow else dict(ADM_BETAS)
    if name == "DDIMScheduler":
        options["clip_sample"] = False
    scheduler = getattr(diffusers, name)(**options)
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule.flow(shift) if flow else NoiseSchedule.linear()
    x = x_T.clone() * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = (x if flow else scheduler.scale_model_input(x, t)).double()
        if flow:
            sigma = float(t) / schedule.num_timesteps
            alpha = 1.0 - sigma
        elif name == "HeunDiscreteScheduler":  # float timesteps: the model sees σ̃ through its input scaling
            edm = float(scheduler.sigmas[scheduler.step_index])
            alpha = 1.0 / math.sqrt(1.0 + edm**2)
            sigma = edm * alpha
        else:
            alpha, sigma = schedule.alpha_sigma(int(t))
        x0, eps = oracle.guided_posterior(model_input, alpha, sigma)
        x = scheduler.step((eps - x0 if flow else eps).to(x.dtype), t, x).prev_sample
    first = float(scheduler.timesteps[0])
    exact = oracle.exact(x_T, schedule, first if flow else int(first))
    return (x.double() - exact).abs().max().item(), len(scheduler.timesteps)


def kdiffusion_sampling() -> types.ModuleType:
    """k-diffusion's samplers, ``k_diffusion.sampling``. Where the package imports whole, as
    is; otherwise the module alone: the package's ``__init__`` imports its training stack
    (scikit-image, clean-fid, CLIP) and ``k_diffusion.utils`` imports torchvision, which does
    not load beside a CPU build of torch, while the samplers use one helper of utils,
    ``append_dims`` (trailing singleton dimensions), given here. Raises ImportError when
    k-diffusion is not installed."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError(
                "k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq trampoline)"
            ) from error
    for name in [name for name in sys.modules if name.split(".")[0] == "k_diffusion"]:
        del sys.modules[name]  # what the failed import left half-made
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, dims: x[(...,) + (None,) * (dims - x.ndim)]
    sys.modules.update({"k_diffusion": importlib.util.module_from_spec(spec), "k_diffusion.utils": utils})
    return importlib.import_module("k_diffusion.sampling")


def kdiffusion_error(oracle: GaussianClasses, name: str, steps: int, x_T: torch.Tensor) -> tuple[float, int]:
    """One k-diffusion sampler on its Karras grid (ρ = 7, n = steps, from ADM's σ̃ at t = 999 to
    σ̃ at t = 0, then 0), the oracle as its denoiser (``edm_denoise``); its x starts at
    x_T/α(999), the same point as the VP runs'."""
    sampling = kdiffusion_sampling()
    schedule = NoiseSchedule.linear()
    edm_sigma = [sigma / alpha for alpha, sigma in (schedule.alpha_sigma(t) for t in (0, 999))]
    sigmas = sampling.get_sigmas_karras(steps, *edm_sigma, rho=7.0).double()
    calls = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(sigma)
        return oracle.edm_denoise(x, float(sigma[0]))

    options, _ = KDIFFUSION[name]
    x = getattr(sampling, name)(denoiser, x_T / schedule.alpha_sigma(999)[0], sigmas, disable=True, **options)
    return (x - oracle.exact(x_T, schedule, 999)).abs().max().item(), len(calls)


def run_oracle(budgets: tuple[int, ...], weights: tuple[float, ...], progress: Callable[[str], None]) -> list[dict]:
    x_T = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for w in weights:
        oracle = GaussianClasses(w)
        vp = NoiseSchedule.linear()
        for name, (sampler, order) in SOLVERS.items():
            for spacing in SPACINGS:
                for budget in budgets:
                    steps = fastguide_steps(budget, vp, sampler, order, spacing)
                    error, calls = fastguide_error(oracle, vp, x_T, sampler, order, steps, spacing)
                    rows.append(
                        dict(
                            path="vp",
                            w=w,
                            impl="fastguide",
                            sampler=name,
                            spacing=spacing,
                            budget=budget,
                            calls=calls,
                            error=error,
                        )
                    )
            progress(f"vp w={w} {name}")
        for name in DIFFUSERS_VP:
            for budget in budgets:
                steps = steps_for(budget, 2 if "Heun" in name else 1)
                error, calls = diffusers_error(oracle, name, steps, x_T)
                rows.append(
                    dict(
                        path="vp",
                        w=w,
                        impl="diffusers",
                        sampler=name,
                        spacing="default",
                        budget=budget,
                        calls=calls,
                        error=error,
                    )
                )
        kdiffusion = KDIFFUSION if importlib.util.find_spec("k_diffusion") is not None else {}
        for name, (_, per_step) in kdiffusion.items():
            for budget in budgets:
                error, calls = kdiffusion_error(oracle, name, steps_for(budget, per_step), x_T)
                rows.append(
                    dict(
                        path="vp",
                        w=w,
                        impl="k-diffusion",
                        sampler=name.removeprefix("sample_"),
                        spacing="karras",
                        budget=budget,
                        calls=calls,
                        error=error,
                    )
                )
        for shift in (1.0, 3.0):
            flow = NoiseSchedule.flow(shift)
            for name, (sampler, order) in SOLVERS.items():
                if sampler == "ddim":
                    continue  # the same update as euler on a flow path
                for budget in budgets:
                    steps = fastguide_steps(budget, flow, sampler, order, "linspace")
                    error, calls = fastguide_error(oracle, flow, x_T, sampler, order, steps, "linspace")
                    rows.append(
                        dict(
                            path=f"flow-shift{shift:g}",
                            w=w,
                            impl="fastguide",
                            sampler=name,
                            spacing="linspace",
                            budget=budget,
                            calls=calls,
                            error=error,
                        )
                    )
            for name in DIFFUSERS_FLOW:
                for budget in budgets:
                    steps = steps_for(budget, 2 if "Heun" in name else 1)
                    error, calls = diffusers_error(oracle, name, steps, x_T.float(), shift)
                    rows.append(
                        dict(
                            path=f"flow-shift{shift:g}",
                            w=w,
                            impl="diffusers",
                            sampler=name,
                            spacing="default",
                            budget=budget,
                            calls=calls,
                            error=error,
                        )
                    )
            progress(f"flow shift={shift:g} w={w}")
    return rows


def digits_frechet(samples: int, progress: Callable[[str], None]) -> list[dict]:
    """Fréchet distance of the digits model's samples (CFG at 2, the CLI's default scale):
    fastguide's default sampler at 5–25 calls and diffusers' DPMSolverMultistep loop (CFG
    written out as in its pipelines; its defaults, and with lambda_min_clipped) at 10–25
    steps, the same labels and x_T."""
    import diffusers

    from fastguide.apps import digits, sweep

    models = digits.load("cpu")
    _, _, held_x, _ = digits.load_dataset(digits.held_out_seed())
    with torch.no_grad():
        real = models.evaluator.features(held_x).numpy()
    labels = torch.arange(samples) % digits.NUM_CLASSES
    x_T = torch.randn(samples, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    unet, scale, rows = models.unet, 2.0, []
    for budget in (5, 10, 15, 20, 25):
        images = GuidedSampler(unet, steps=budget, schedule=digits.schedule(), guidance=CFG(scale))(
            x_T.shape, labels=labels, noise=x_T
        )
        rows.append(
            dict(
                impl="fastguide",
                sampler="unipc",
                spacing="logsnr",
                budget=budget,
                **sweep.score(models, images.clamp(-1, 1), labels, real),
            )
        )
        progress(f"digits fastguide {budget}")
    null = torch.full_like(labels, unet.num_classes)
    # diffusers' defaults start at t = 999, where the cosine schedule's σ̃ = 2·10⁴ ruins every
    # unclipped sample; lambda_min_clipped=-5.1 is its documented setting for this schedule.
    for variant, options in (("default", {}), ("lambda_min_clipped=-5.1", {"lambda_min_clipped": -5.1})):
        for budget in (10, 20, 25):
            scheduler = diffusers.DPMSolverMultistepScheduler(
                num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", **options
            )
            scheduler.set_timesteps(budget)
            x = x_T.clone()
            with torch.no_grad():
                for t in scheduler.timesteps:
                    t_in = torch.full((2 * samples,), int(t))
                    cond, uncond = unet(torch.cat([x, x]), t_in, torch.cat([labels, null])).chunk(2)
                    x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
            rows.append(
                dict(
                    impl="diffusers",
                    sampler="DPMSolverMultistepScheduler",
                    spacing=variant,
                    budget=budget,
                    **sweep.score(models, x.clamp(-1, 1), labels, real),
                )
            )
            progress(f"digits diffusers {variant} {budget}")
    return rows


def markdown(rows: list[dict], budgets: tuple[int, ...]) -> str:
    """One table per path and weight: each implementation's error by model calls."""
    lines = []
    keys = sorted({(r["path"], r["w"]) for r in rows if "path" in r})
    for path, w in keys:
        lines += [
            f"\n### {path}, CFG w = {w:g}: max |x − x_ODE| by model calls\n",
            "| impl | sampler | spacing | " + " | ".join(str(b) for b in budgets) + " |",
            "|---|---|---|" + "---|" * len(budgets),
        ]
        table: dict[tuple, dict[int, float]] = {}
        for r in rows:
            if r.get("path") == path and r.get("w") == w:
                table.setdefault((r["impl"], r["sampler"], r["spacing"]), {})[r["budget"]] = r["error"]
        for (impl, sampler, spacing), errors in table.items():
            cells = " | ".join(f"{errors[b]:.3g}" if b in errors else "" for b in budgets)
            lines.append(f"| {impl} | {sampler} | {spacing} | {cells} |")
    digit_rows = [r for r in rows if "frechet" in r]
    if digit_rows:
        lines += [
            "\n### Digits model, CFG 2: Fréchet distance by model calls\n",
            "| impl | sampler | settings | calls | Fréchet distance | accuracy |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['impl']} | {r['sampler']} | {r['spacing']} | {r['budget']} | {r['frechet']:.3f} | "
            f"{r['accuracy']:.3f} |"
            for r in digit_rows
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Error against model calls at w = 3 on the VP path: each solver on its best spacing
    at 25 calls, and the peers' (diffusers' schedulers, k-diffusion's samplers) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r.get("path") == "vp" and r.get("w") == 3.0]
    curves: dict[str, dict[int, float]] = {}
    for r in chosen:
        curves.setdefault(f"{r['impl']} {r['sampler']} ({r['spacing']})", {})[r["budget"]] = r["error"]
    best: dict[str, str] = {}
    for label, errors in curves.items():
        family = label.rsplit(" (", 1)[0]
        if family not in best or errors.get(25, math.inf) < curves[best[family]].get(25, math.inf):
            best[family] = label
    figure, axes = plt.subplots(figsize=(10, 5))
    axes.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour per curve (up to 18)
    for label in best.values():
        errors = curves[label]
        axes.loglog(
            sorted(errors),
            [errors[b] for b in sorted(errors)],
            marker="o",
            linestyle="-" if label.startswith("fastguide") else "--",
            label=label,
        )
    axes.set_xlabel("model calls")
    axes.set_ylabel("max |x − x_ODE| (exact Gaussian oracle, CFG w = 3)")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("nfe-results"))
    parser.add_argument("--quick", action="store_true", help="w = 3 and 10 and 25 calls only, no digits")
    parser.add_argument("--digits-samples", type=at_least(2), default=500)  # a Fréchet distance needs a covariance
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budgets, weights = ((10, 25), (3.0,)) if args.quick else (BUDGETS, WEIGHTS)
    say = progress_printer()
    rows = run_oracle(budgets, weights, say)
    if not args.quick:
        rows += digits_frechet(args.digits_samples, say)
    write_study(args.out, "nfe", {"rows": rows}, markdown(rows, budgets), lambda path: plot(rows, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
