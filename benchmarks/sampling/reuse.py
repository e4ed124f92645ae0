"""Guidance at less than two forwards on the digits models: quality against compute.

    python -m benchmarks.sampling.reuse [--out DIR] [--quick] [--samples N]
    (or: fastguide bench --reuse --out DIR)

Each row samples the shipped digits UNet (eps, cosine VP schedule) or the digits flow
transformer (a 4-block fastguide.DiT) with CFG at w = 2 and the default sampler (UniPC),
from the same noise and labels, and is scored by:
- compute, counted exactly, not timed: model rows × blocks evaluated (``GuidedSampler.
  last_compute``; for diffusers' hooks, the rows each block actually ran), relative to
  plain CFG at 25 steps (1.0 = 2B rows through every block at 25 calls); every block
  weighs the same, which the DiT's equal blocks do but the UNet's do not (its first two
  blocks, which a cache always runs, are 6.5% of its FLOPs: BENCHMARKS.md);
- the Fréchet distance and accuracy of the project's evaluator (fastguide.apps.sweep.score);
- deviation: mean |x − x_ref| from the same network's plain CFG at 25 steps, same noise.

Rows: plain CFG at fewer steps (the baseline any saving must beat: the same compute spent
on fewer calls); truncated CFG (``CFG(w, truncate=γ)``); delta reuse (``CFG(w,
reuse=DeltaReuse(every=k, order))``); fastguide's First-Block Cache (``cache=
FirstBlockCache(t, order)``) and its fixed-schedule variant (``cache=ForecastCache(k)``,
TaylorSeer's rule over the whole block stack), each also with delta reuse; and on the
transformer, diffusers' own cache hooks (``FirstBlockCacheConfig``, ``MagCacheConfig``
with magnitude ratios calibrated on the same run, and ``TaylorSeerCacheConfig`` caching
whole blocks) on a diffusers ``DiTTransformer2DModel`` holding the same weights
(fastguide.models.diffusers_dit), called by the same loop, and cache-dit's DBCache (its
first block computed, the other three cached: ``DBCacheConfig(Fn_compute_blocks=1,
Bn_compute_blocks=0)``, cache-dit's own DiT patch) on the same diffusers model, when
cache-dit is installed (the test extra installs it). diffusers' attention-level
hooks (``PyramidAttentionBroadcastConfig``, ``FasterCacheConfig``) skip attention but
not blocks, which this count of rows × blocks cannot weigh: they are not rows here.
Writes DIR/reuse.json, DIR/reuse.md, DIR/reuse.png.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from benchmarks.sampling.study import at_least, progress_printer, write_study
from fastguide import CFG, DeltaReuse, FirstBlockCache, ForecastCache, GuidedSampler
from fastguide.apps import digits
from fastguide.apps.sweep import score

SCALE = 2.0
CALLS = 25
FEWER_STEPS = (24, 23, 22, 21, 20, 19, 17, 15, 14, 13, 12, 10, 8)
TRUNCATE = (0.95, 0.98, 0.99, 0.995, 0.999)
REUSE = ((2, 0), (2, 1), (3, 0), (3, 1), (4, 1))
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
EXTRAPOLATED_THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
# Delta reuse (every, order) with First-Block Cache (threshold, order): the two savings multiply.
COMBINED = (((2, 1), (0.1, 1)), ((2, 1), (0.15, 1)), ((3, 1), (0.15, 1)), ((2, 1), (0.2, 1)))
FORECAST_EVERY = (2, 3, 4)
# Delta reuse (every, order) with ForecastCache(every): every 4th guided call runs u, so the
# computed calls of a forecast every 2nd alternate 2B and B rows.
FORECAST_COMBINED = (((4, 1), 2),)
DIFFUSERS_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
TAYLORSEER_INTERVALS = (2, 3, 4)
MAGCACHE_THRESHOLDS = (0.06, 0.12, 0.24)
DBCACHE_THRESHOLDS = (0.1, 0.2, 0.3, 0.5)
QUICK = dict(
    fewer=(13,),
    truncate=(0.99,),
    reuse=((2, 1),),
    thresholds=(0.2,),
    extrapolated=(0.3,),
    combined=(((2, 1), (0.15, 1)),),
    forecast=(2,),
    forecast_combined=(((4, 1), 2),),
    diffusers=(0.2,),
    taylorseer=(2,),
    magcache=(0.12,),
    dbcache=(0.2,),
)


class _Network:
    """One of the digits networks, how to sample it and how many blocks it has."""

    def __init__(self, name: str, model: torch.nn.Module, blocks: int, **path):
        self.name, self.model, self.blocks, self.path = name, model, blocks, path


def networks(models: digits.DigitsModels) -> list[_Network]:
    unet, transformer = models.unet.float(), models.transformer.float()
    unet_blocks = len(unet.input_blocks) + 1 + len(unet.output_blocks)
    return [
        _Network("digits UNet", unet, unet_blocks, schedule=digits.schedule()),
        _Network(
            "digits transformer",
            transformer,
            len(transformer.blocks),
            schedule=digits.flow_schedule(),
            prediction_type="flow_prediction",
            clip_denoised=True,  # pixels in [−1, 1] (a flow path's default is no clip: latents)
        ),
    ]


def sample_row(
    network: _Network,
    model,
    labels: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int = CALLS,
    guidance=None,
    cache=None,
    count_blocks: Callable[[], int] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Samples and the compute of one row: block_rows from the run's own count, else rows × blocks."""
    sampler = GuidedSampler(
        model,
        steps=steps,
        guidance=guidance or CFG(SCALE),
        cache=cache,
        null_label=digits.NUM_CLASSES,
        num_classes=digits.NUM_CLASSES,
        **network.path,
    )
    images = sampler(noise.shape, labels=labels, noise=noise)
    compute = sampler.last_compute
    block_rows = compute["block_rows"] if compute["block_rows"] is not None else compute["model_rows"] * network.blocks
    if count_blocks is not None:
        block_rows = count_blocks()
    return images, {
        "steps": steps,
        "model_rows": compute["model_rows"],
        "block_rows": block_rows,
        "truncated_from": compute["truncated_from"],
    }


@contextlib.contextmanager
def counting_diffusers_blocks() -> Iterator[Callable[[], int]]:
    """Count the rows each diffusers BasicTransformerBlock evaluates (patched on the class
    before any hook wraps an instance, so a block a hook skips is not counted)."""
    from diffusers.models.attention import BasicTransformerBlock

    rows = [0]
    forward = BasicTransformerBlock.forward

    def counted(self, hidden_states, *args, **kwargs):
        rows[0] += hidden_states.shape[0]
        return forward(self, hidden_states, *args, **kwargs)

    BasicTransformerBlock.forward = counted
    try:
        yield lambda: rows[0]
    finally:
        BasicTransformerBlock.forward = forward


class _InCacheContext(torch.nn.Module):
    """A diffusers model called inside its hooks' cache context, as diffusers' pipelines call
    it for batched CFG (one context for the [cond; uncond] batch), with the step index."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.num_classes, self.calls = model, model.num_classes, 0

    def forward(self, x, t, y):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        _set_cache_context(self.model.transformer, CacheContext("cond_uncond", step_index=self.calls))
        self.calls += 1
        try:
            return self.model(x, t, y)
        finally:
            _set_cache_context(self.model.transformer, None)


def diffusers_rows(network: _Network, labels, noise, quick: bool, evaluate, say) -> list[dict]:
    """diffusers' cache hooks on its DiTTransformer2DModel holding the transformer's weights,
    then cache-dit's DBCache on the same model (deviations from diffusers' uncached run)."""
    try:
        from diffusers.hooks import (
            FirstBlockCacheConfig,
            MagCacheConfig,
            TaylorSeerCacheConfig,
            apply_first_block_cache,
            apply_mag_cache,
            apply_taylorseer_cache,
        )
    except ImportError as error:
        say(f"diffusers' cache hooks are not importable here ({error}): no diffusers rows")
        return []
    from fastguide.models.diffusers_dit import DiffusersDiT, to_diffusers

    rows = []
    with counting_diffusers_blocks() as counted:
        baseline_model = DiffusersDiT(to_diffusers(network.model))
        start = counted()
        reference, compute = sample_row(network, baseline_model, labels, noise, count_blocks=lambda: counted() - start)
        rows.append(evaluate(network, "diffusers (no cache)", "-", reference, compute, reference))
        settings = [
            (
                "diffusers FirstBlockCacheConfig",
                f"threshold={t}",
                apply_first_block_cache,
                lambda t=t: FirstBlockCacheConfig(threshold=t),
            )
            for t in (QUICK["diffusers"] if quick else DIFFUSERS_THRESHOLDS)
        ]
        settings += [
            (
                "diffusers TaylorSeerCacheConfig",
                f"cache_interval={k}",
                apply_taylorseer_cache,
                lambda k=k: TaylorSeerCacheConfig(
                    cache_interval=k,
                    disable_cache_before_step=2,
                    taylor_factors_dtype=torch.float32,
                    cache_identifiers=[r"transformer_blocks\.\d+"],
                ),
            )
            for k in (QUICK["taylorseer"] if quick else TAYLORSEER_INTERVALS)
        ]
        ratios = _calibrated_mag_ratios(network, labels, noise, MagCacheConfig, apply_mag_cache)
        settings += [
            (
                "diffusers MagCacheConfig",
                f"threshold={t}",
                apply_mag_cache,
                lambda t=t: MagCacheConfig(threshold=t, num_inference_steps=CALLS, mag_ratios=ratios),
            )
            for t in (QUICK["magcache"] if quick else MAGCACHE_THRESHOLDS)
        ]
        for method, setting, apply, config in settings:
            model = DiffusersDiT(to_diffusers(network.model))
            apply(model.transformer, config())
            start = counted()
            images, compute = sample_row(
                network, _InCacheContext(model), labels, noise, count_blocks=lambda: counted() - start
            )
            rows.append(evaluate(network, method, setting, images, compute, reference))
            say(f"{network.name}: {method} {setting}")
    return rows + cache_dit_rows(network, labels, noise, quick, reference, evaluate, say)


def cache_dit_rows(network: _Network, labels, noise, quick: bool, reference, evaluate, say) -> list[dict]:
    """cache-dit's DBCache on the diffusers DiTTransformer2DModel holding the transformer's
    weights: the first block decides (its residual's relative change below the threshold),
    the others are cached, after 2 warm-up calls (F1B0, W2)."""
    try:
        import cache_dit
        from cache_dit.caching.patch_functors import DiTPatchFunctor
    except ImportError as error:
        say(f"cache-dit is not importable here ({error}): no cache-dit rows")
        return []
    from fastguide.models.diffusers_dit import DiffusersDiT, to_diffusers

    rows = []
    with counting_diffusers_blocks() as counted:
        for threshold in QUICK["dbcache"] if quick else DBCACHE_THRESHOLDS:
            model = DiffusersDiT(to_diffusers(network.model))
            transformer = model.transformer
            adapter = cache_dit.BlockAdapter(
                transformer=transformer,
                blocks=transformer.transformer_blocks,
                forward_pattern=cache_dit.ForwardPattern.Pattern_3,
                patch_functor=DiTPatchFunctor(),
            )
            config = cache_dit.DBCacheConfig(
                Fn_compute_blocks=1,
                Bn_compute_blocks=0,
                residual_diff_threshold=threshold,
                max_warmup_steps=2,
                num_inference_steps=CALLS,
            )
            with contextlib.redirect_stdout(io.StringIO()):  # its adapter reports what it patched
                cache_dit.enable_cache(adapter, cache_config=config)
            start = counted()
            images, compute = sample_row(network, model, labels, noise, count_blocks=lambda: counted() - start)
            rows.append(
                evaluate(network, "cache-dit DBCache", f"F1B0, threshold={threshold}", images, compute, reference)
            )
            say(f"{network.name}: cache-dit DBCache {threshold}")
    return rows


def _calibrated_mag_ratios(network: _Network, labels, noise, config_class, apply) -> list[float]:
    """MagCache's magnitude ratios for this network and run: one run in its calibration
    mode, which prints them (the way diffusers hands them over) at its last call."""
    from fastguide.models.diffusers_dit import DiffusersDiT, to_diffusers

    model = DiffusersDiT(to_diffusers(network.model))
    apply(model.transformer, config_class(calibrate=True, num_inference_steps=CALLS))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        sample_row(network, _InCacheContext(model), labels, noise)
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()!r}")
    ratios = ast.literal_eval(lists[-1])
    if len(ratios) != CALLS:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {CALLS} calls")
    return ratios


def run(samples: int, quick: bool, say: Callable[[str], None]) -> list[dict]:
    models = digits.load("cpu")
    _, _, held_x, _ = digits.load_dataset(digits.held_out_seed(networks=("transformer",)))
    with torch.no_grad():
        real_features = models.evaluator.features(held_x).numpy()
    labels = torch.arange(samples) % digits.NUM_CLASSES
    noise = torch.randn((samples, 1, digits.IMAGE_SIZE, digits.IMAGE_SIZE), generator=torch.Generator().manual_seed(0))
    settings = (
        QUICK
        if quick
        else dict(
            fewer=FEWER_STEPS,
            truncate=TRUNCATE,
            reuse=REUSE,
            thresholds=THRESHOLDS,
            extrapolated=EXTRAPOLATED_THRESHOLDS,
            combined=COMBINED,
            forecast=FORECAST_EVERY,
            forecast_combined=FORECAST_COMBINED,
        )
    )

    def evaluate(network, method, setting, images, compute, reference) -> dict:
        full = 2 * samples * CALLS * network.blocks
        return {
            "model": network.name,
            "method": method,
            "setting": setting,
            **compute,
            "compute": compute["block_rows"] / full,
            **score(models, images, labels, real_features),
            "deviation": (images - reference).abs().mean().item(),
        }

    rows = []
    for network in networks(models):
        reference, compute = sample_row(network, network.model, labels, noise)
        rows.append(evaluate(network, "CFG", f"{CALLS} steps", reference, compute, reference))
        for steps in settings["fewer"]:
            images, compute = sample_row(network, network.model, labels, noise, steps=steps)
            rows.append(evaluate(network, "CFG, fewer steps", f"{steps} steps", images, compute, reference))
        for gamma in settings["truncate"]:
            images, compute = sample_row(network, network.model, labels, noise, guidance=CFG(SCALE, truncate=gamma))
            rows.append(evaluate(network, "truncated CFG", f"γ={gamma}", images, compute, reference))
        for every, order in settings["reuse"]:
            guidance = CFG(SCALE, reuse=DeltaReuse(every=every, order=order))
            images, compute = sample_row(network, network.model, labels, noise, guidance=guidance)
            rows.append(evaluate(network, "delta reuse", f"every={every}, order={order}", images, compute, reference))
        for threshold in settings["thresholds"]:
            images, compute = sample_row(network, network.model, labels, noise, cache=FirstBlockCache(threshold))
            rows.append(evaluate(network, "FirstBlockCache", f"threshold={threshold}", images, compute, reference))
        for threshold in settings["extrapolated"]:
            images, compute = sample_row(
                network, network.model, labels, noise, cache=FirstBlockCache(threshold, order=1)
            )
            rows.append(
                evaluate(network, "FirstBlockCache, order 1", f"threshold={threshold}", images, compute, reference)
            )
        for (every, order), (threshold, cache_order) in settings["combined"]:
            images, compute = sample_row(
                network,
                network.model,
                labels,
                noise,
                guidance=CFG(SCALE, reuse=DeltaReuse(every=every, order=order)),
                cache=FirstBlockCache(threshold, order=cache_order),
            )
            rows.append(
                evaluate(
                    network,
                    "delta reuse + FirstBlockCache",
                    f"every={every}, order={order}; threshold={threshold}, order={cache_order}",
                    images,
                    compute,
                    reference,
                )
            )
        for every in settings["forecast"]:
            images, compute = sample_row(network, network.model, labels, noise, cache=ForecastCache(every))
            rows.append(evaluate(network, "ForecastCache", f"every={every}", images, compute, reference))
        for (every, order), forecast_every in settings["forecast_combined"]:
            images, compute = sample_row(
                network,
                network.model,
                labels,
                noise,
                guidance=CFG(SCALE, reuse=DeltaReuse(every=every, order=order)),
                cache=ForecastCache(forecast_every),
            )
            rows.append(
                evaluate(
                    network,
                    "delta reuse + ForecastCache",
                    f"every={every}, order={order}; every={forecast_every}",
                    images,
                    compute,
                    reference,
                )
            )
        if network.name == "digits transformer":
            rows += diffusers_rows(network, labels, noise, quick, evaluate, say)
        say(f"{network.name}: {len(rows)} rows so far")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [
            f"### {model}",
            "",
            "| method | setting | compute | model rows | Fréchet distance | accuracy | deviation |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: -r["compute"]):
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['compute']:.3f} | {r['model_rows']} "
                f"| {r['frechet']:.3f} | {r['accuracy']:.3f} | {r['deviation']:.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        for row, metric in enumerate(("frechet", "deviation")):
            ax = axes[row][column]
            model_rows = [r for r in rows if r["model"] == model]
            for method in dict.fromkeys(r["method"] for r in model_rows):
                points = sorted((r["compute"], r[metric]) for r in model_rows if r["method"] == method)
                peer = method.startswith(("diffusers", "cache-dit"))
                style = "k--" if method == "CFG, fewer steps" else "o" if peer else "o-"
                ax.plot(*zip(*points), style, label=method, markersize=4)
            ax.set_xlabel("compute (block rows / plain CFG at 25 steps)")
            ax.set_ylabel({"frechet": "Fréchet distance", "deviation": "mean |x − x_CFG,25|"}[metric])
            ax.set_title(model)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("reuse-results"))
    parser.add_argument("--quick", action="store_true", help="one setting per method, 40 samples (CI)")
    parser.add_argument(
        "--samples",
        type=at_least(2),  # a Fréchet distance needs a covariance
        default=None,
        help="samples per row (default 500; 40 with --quick)",
    )
    args = parser.parse_args(argv)
    samples = args.samples if args.samples is not None else 40 if args.quick else 500
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(samples, args.quick, progress_printer())
    write_study(
        args.out,
        "reuse",
        {"samples": samples, "scale": SCALE, "calls": CALLS, "rows": rows},
        markdown(rows),
        lambda path: plot(rows, path),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
