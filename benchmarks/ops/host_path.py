"""The ops' own host path per call, split from the backend's: on tiny tensors, back to back
under no_grad, each op called through ``fastguide.ops``, the same math in eager PyTorch's
own ops (the peer: what a user's loop calls instead), its backend's function called
directly with the arguments the op handed it (captured from a first call), and the op
called with that function replaced by a stub returning its first results: the last is
fastguide's part alone (validation, backend resolution, dispatch, the tensors'
preparation), what a launch-bound loop pays per op on top of the backend's own launch
path. (The whole minus the backend's function overstates it: on the development CPU by
about 25 µs a call, which neither part costs alone.)

    OMP_NUM_THREADS=1 python benchmarks/ops/host_path.py [--device cpu|cuda] [--calls 2000] [--rounds 7]

On the CPU the backend is ``torch`` (its function is the reference math). On CUDA every
backend that runs (``triton``; ``cuda`` when the extension is built) gets a row, and one
ATen launch (a tiny ``torch.add``) is timed beside them as the host's yardstick. Prints,
per op and backend, the medians over the rounds of µs per call. Run two checkouts back to
back (PYTHONPATH=<other checkout>) to compare them; absolute CPU times vary ±20%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastguide
from fastguide import ops
from fastguide.ops import backends
from fastguide.ops.contract import GuidanceCombine, StepCoefficients

# op -> the backend-module function that op's forward calls
BACKEND_FUNCTIONS = {
    "guided_step": "guided_step",
    "layer_norm": "layer_norm_forward",
    "group_norm": "group_norm_forward",
    "attention": "attention_forward",
}


def per_call_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """µs per call of ``calls`` back-to-back calls, until the device has run them."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def cases(device: torch.device) -> dict[str, tuple[str, Callable[[], object], Callable[[], object]]]:
    """name -> (op, a call of it through fastguide.ops, the same math in eager PyTorch's
    own ops, as a user's loop or model writes it) on small random tensors."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    tokens, scale, shift = randn(2, 4, 8), randn(2, 8), randn(2, 8)
    image, weight, bias = randn(2, 8, 4, 4), randn(8), randn(8)
    # channels_last with channels a multiple of 16: the one-launch forward on the GPU
    image_nhwc, weight16, bias16 = randn(2, 16, 4, 4).to(memory_format=torch.channels_last), randn(16), randn(16)
    scale16, shift16 = randn(2, 16), randn(2, 16)
    q = randn(1, 2, 5, 8)
    q16 = q.half()
    x, model_output, out = randn(1, 3, 8, 8), randn(2, 3, 8, 8), randn(2, 3, 8, 8)
    step = StepCoefficients(alpha=0.8, sigma=0.6, k_x0=0.7, k_eps=0.5, clip_denoised=True)
    combine = GuidanceCombine(3.0)

    def eager_step() -> torch.Tensor:
        cond, uncond = model_output.chunk(2)
        eps = uncond + 3.0 * (cond - uncond)
        x0 = ((x - 0.6 * eps) / 0.8).clamp(-1, 1)
        eps = (x - 0.8 * x0) / 0.6  # re-derived from the clipped x0
        x_next = 0.7 * x0 + 0.5 * eps
        return torch.cat([x_next, x_next], out=out)

    def eager_group_norm(image: torch.Tensor, weight, bias, scale, shift) -> torch.Tensor:
        y = F.group_norm(image, 4, weight, bias) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return F.silu(y)

    return {
        "guided_step (CFG + DDIM, 2B out)": (
            "guided_step",
            lambda: ops.guided_step(model_output, x, step, combine, out=out),
            eager_step,
        ),
        "layer_norm (+ adaLN scale, shift)": (
            "layer_norm",
            lambda: ops.layer_norm(tokens, (8,), scale=scale, shift=shift),
            lambda: F.layer_norm(tokens, (8,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None],
        ),
        "group_norm (+ scale-shift, SiLU)": (
            "group_norm",
            lambda: ops.group_norm(image, 4, weight, bias, scale=scale, shift=shift, activation="silu"),
            lambda: eager_group_norm(image, weight, bias, scale, shift),
        ),
        "group_norm, channels_last": (
            "group_norm",
            lambda: ops.group_norm(image_nhwc, 4, weight16, bias16, scale=scale16, shift=shift16, activation="silu"),
            lambda: eager_group_norm(image_nhwc, weight16, bias16, scale16, shift16),
        ),
        "attention": ("attention", lambda: ops.attention(q, q, q), lambda: F.scaled_dot_product_attention(q, q, q)),
        # fp16 takes the TMA forward on sm_90 (four tensor descriptors built a call)
        "attention, fp16": (
            "attention",
            lambda: ops.attention(q16, q16, q16),
            lambda: F.scaled_dot_product_attention(q16, q16, q16),
        ),
    }


def backend_call(
    op: str, backend: str, call: Callable[[], object]
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(the backend's own function for ``op`` bound to the arguments ``call`` hands it,
    ``call`` with that function stubbed: returning its first results at once)."""
    module = backends.IMPLEMENTATIONS[backend].implementation(op)
    name = BACKEND_FUNCTIONS[op]
    function, seen = getattr(module, name), []

    def recording(*args: object, **kwargs: object) -> object:
        result = function(*args, **kwargs)
        seen.append((args, kwargs, result))
        return result

    setattr(module, name, recording)
    try:
        with fastguide.backend(backend):
            call()
    finally:
        setattr(module, name, function)
    if not seen:
        raise RuntimeError(f"{op} on backend {backend!r} did not reach {module.__name__}.{name}")
    args, kwargs, result = seen[0]

    def stubbed() -> object:
        setattr(module, name, lambda *args, **kwargs: result)
        try:
            return call()
        finally:
            setattr(module, name, function)

    return (lambda: function(*args, **kwargs)), stubbed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    names = (
        ("torch",)
        if device.type == "cpu"
        else tuple(name for name in ("triton", "cuda") if backends.why_not(name, device) is None)
    )
    print(f"Host path per op call on {device} (µs, median of {args.rounds} rounds of {args.calls} calls)\n")
    print(
        "| op | backend | through fastguide.ops | eager PyTorch | the backend's function "
        "| fastguide's part (backend stubbed) |\n|---|---|---|---|---|---|"
    )
    with torch.no_grad():
        a = torch.zeros(4, device=device)
        launch = statistics.median(
            per_call_us(lambda: torch.add(a, a, out=a), args.calls, device) for _ in range(args.rounds)
        )
        for label, (op, call, eager) in cases(device).items():
            for backend in names:
                if not backends.IMPLEMENTATIONS[backend].has_kernel(op):
                    continue
                direct, stubbed = backend_call(op, backend, call)
                with fastguide.backend(backend):  # chosen once: its context is no part of any time
                    for fn in (call, eager, direct, stubbed):  # warm-up: compile, autotune, load
                        per_call_us(fn, 200, device)
                    rounds = [
                        tuple(per_call_us(fn, args.calls, device) for fn in (call, eager, direct, stubbed))
                        for _ in range(args.rounds)
                    ]
                whole, peer, backend_only, ours = (statistics.median(r[i] for r in rounds) for i in range(4))
                print(f"| {label} | {backend} | {whole:.1f} | {peer:.1f} | {backend_only:.1f} | {ours:.1f} |")
    print(f"\nOne ATen launch (torch.add of 4 elements) on {device}: {launch:.1f} µs")


if __name__ == "__main__":
    main()
