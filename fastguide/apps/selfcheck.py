"""Run the four ops on this machine and print their agreement with the textbook formulas.

    fastguide selfcheck [--device cpu|cuda] [--seed N]   (or python -m fastguide.apps.selfcheck)

Each op runs through ``fastguide.ops`` (the backend ``auto`` picks, or FASTGUIDE_BACKEND)
on random float32 inputs of odd sizes and is compared with its formula written out
in float64. Exits non-zero when any op is outside its float32 tolerance.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from .. import ops
from ..ops import backends

TOLERANCE = 1e-4  # float32 inputs against float64 formulas, max abs error


def check_attention(device: torch.device, g: torch.Generator) -> float:
    q, k, v = (torch.randn(2, 3, n, 40, generator=g).to(device) for n in (77, 129, 129))
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(40)
    expected = torch.softmax(scores, dim=-1) @ v.double()
    return (ops.attention(q, k, v).double() - expected).abs().max().item()


def check_group_norm(device: torch.device, g: torch.Generator) -> float:
    x = torch.randn(2, 96, 7, 13, generator=g).to(device)
    weight, bias = torch.rand(96, generator=g).to(device) + 0.5, torch.randn(96, generator=g).to(device)
    scale, shift = torch.randn(2, 96, generator=g).to(device), torch.randn(2, 96, generator=g).to(device)
    y = ops.group_norm(x, 32, weight, bias, scale=scale, shift=shift, activation="silu")
    grouped = x.double().reshape(2, 32, -1)
    norm = (
        (grouped - grouped.mean(-1, keepdim=True)) / torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ).reshape(x.shape)
    affine = norm * weight.double()[:, None, None] + bias.double()[:, None, None]
    z = affine * (1 + scale.double()[..., None, None]) + shift.double()[..., None, None]
    return (y.double() - F.silu(z)).abs().max().item()


def check_layer_norm(device: torch.device, g: torch.Generator) -> float:
    # DiT's adaLN: LayerNorm without affine (eps 1e-6), then ·(1 + scale) + shift per sample.
    x = torch.randn(3, 7, 72, generator=g).to(device)
    scale, shift = torch.randn(3, 72, generator=g).to(device), torch.randn(3, 72, generator=g).to(device)
    y = ops.layer_norm(x, (72,), None, None, 1e-6, scale=scale, shift=shift)
    norm = (x.double() - x.double().mean(-1, keepdim=True)) / torch.sqrt(
        x.double().var(-1, unbiased=False, keepdim=True) + 1e-6
    )
    expected = norm * (1 + scale.double()[:, None]) + shift.double()[:, None]
    return (y.double() - expected).abs().max().item()


def check_guided_step(device: torch.device, g: torch.Generator) -> float:
    # One DDIM step (eta = 0) with classifier-free guidance and x0 clipping.
    abar_t, abar_prev, w = 0.5, 0.7, 4.0
    x = torch.randn(3, 3, 16, 16, generator=g).to(device)
    model_output = torch.randn(6, 3, 16, 16, generator=g).to(device)
    step = ops.StepCoefficients(
        alpha=math.sqrt(abar_t),
        sigma=math.sqrt(1 - abar_t),
        clip_denoised=True,
        k_x0=math.sqrt(abar_prev),
        k_eps=math.sqrt(1 - abar_prev),
    )
    x_next = ops.guided_step(model_output, x, step, ops.GuidanceCombine(w))
    cond, uncond = model_output.double().chunk(2)
    eps = uncond + w * (cond - uncond)
    x0 = ((x.double() - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)).clamp(-1, 1)
    eps = (x.double() - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    return (x_next.double() - expected).abs().max().item()


CHECKS = {
    "attention": check_attention,
    "group_norm": check_group_norm,
    "layer_norm": check_layer_norm,
    "guided_step": check_guided_step,
}


def run(device: torch.device, seed: int = 0) -> int:
    """Print each op's error against its formula on ``device``; 1 when any is out of tolerance."""
    print(f"fastguide self-check on {device} (backend setting: {backends.get_backend()})")
    failures = 0
    for name, check in CHECKS.items():
        # An op that raises (a backend that cannot run, an extension that does not load, a
        # kernel that does not compile) is a failure to report, and the others still run:
        # this is the command people run when something is broken.
        try:
            backend = ops.dispatch.backend_for(name, device, torch.float32)
            error = check(device, torch.Generator().manual_seed(seed))
        except Exception as raised:
            failures += 1
            message = (str(raised).strip().splitlines() or [""])[0]
            print(f"  {name:<12} FAIL: {type(raised).__name__}: {message}")
            continue
        ok = error <= TOLERANCE
        failures += not ok
        print(
            f"  {name:<12} backend={backend:<7} max |error| vs float64 formula = {error:.2e}  {'ok' if ok else 'FAIL'}"
        )
    print(
        "backends here:",
        ", ".join(f"{n}: {'ok' if r is None else r}" for n, r in backends.available_backends().items()),
    )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """``fastguide selfcheck`` (options checked there: bad ones exit 2 with one line)."""
    from .cli import main as cli_main

    return cli_main(["selfcheck", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
