"""Static report of every kernel, compiled ahead of time for sm_80 and sm_90.

    python tools/kernel_report.py [--arch 80 90] [--json PATH] [--check]
        [--require-nvcc] [--torch-cuda-include DIR] [--triton-only] [--compile-only]

The report is the installed Triton's: CI runs it again under the GPU image's Triton (3.6,
the one torch 2.11 pins) with --triton-only, since Triton releases lay out and schedule the
same kernel differently (3.6 spread one GroupNorm tile's unrolled axis over lanes, at
twice the registers, where 3.9 kept it in a thread), and under the oldest Triton
supported (3.2) with --compile-only: every kernel must compile there (3.2 could not hash a
JIT function that calls itself), but no rule is held to its SASS.

Runs on a machine without a GPU: Triton compiles for a GPUTarget and ships cuobjdump.
For each Triton kernel, in representative specialisations (16-byte aligned pointers and
sizes, as the runtime JIT infers from real tensors), it prints registers per thread,
local memory (spills), shared memory, the width of global loads and stores in the
SASS, and tensor-core instructions. ``--check`` exits non-zero on any spill or on a
main path whose global loads are not all 128-bit (but a float a row of per-row
statistics, where the case allows it: ``vector_loads_only``), or on fp16/bf16
attention without tensor-core instructions.

Each row also says how many bytes of loads one SM can have in flight: registers and
shared memory per block give the resident blocks per SM (``occupancy``), and those blocks'
threads times the bytes each thread has in flight at once give the bytes in flight. A
thread's bytes at once are its widest global loads (LDG.E.128 in a vectorised kernel) issued
before it uses any of them: the largest such run in the function's SASS
(``loads_issued_together``, the "widest loads together" column beside the total counts),
so loads issued one pair at a time in a loop, or repeated on a peeled or tail path, count
once. A memory-bound kernel needs, by Little's law, bandwidth × latency / SMs of them in
flight to keep HBM busy (``IN_FLIGHT_FLOOR``); ``--check`` fails on a memory-bound kernel
below it, except those listed in ``KNOWN_BELOW_FLOOR`` (being redesigned), and on a listed
kernel that is no longer below it (so the list shrinks with every fix). The count is
static: a run may pass guarded branches into optional loads that a common call skips
(CUDA_MAIN_PATH_VECTORS caps those kernels), and it ends conservatively at every jump
target, so a kernel whose loads straddle one may have more in flight than counted.

The CUDA kernels of csrc/ (the cuda backend) get the same table: nvcc compiles each
source on its own for every architecture with warnings as errors (a warning fails the
report), and ``--check`` also fails on a spill or on a vectorised specialisation
without 16-byte loads (and, where it writes a tensor, stores), or, in the channels_last
backward sums, which read channel pairs, loads of a pair (``occupancy.vector_bits``).
Without nvcc that part is skipped, unless ``--require-nvcc``. With
``--torch-cuda-include`` (torch/include of a CUDA build of torch) the host compiler also
checks csrc/bindings.cpp against it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

# The report compiles for real GPUs; the interpreter would replace the kernels.
os.environ["TRITON_INTERPRET"] = "0"
# Run as a script (python tools/kernel_report.py): its sibling modules are tools.*.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.runtime.autotuner  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402

# Triton before 3.3 (3.2, the floor pyproject names) asks the active GPU driver for the
# autotuner's timer when an autotuned kernel is defined, which raises where there is no
# GPU; the report compiles and never times, so it answers for the driver.
if not isinstance(getattr(Autotuner, "do_bench", None), property):
    triton.runtime.autotuner.driver = SimpleNamespace(active=SimpleNamespace(get_benchmarker=lambda: None))

from fastguide.kernels import attention, group_norm, guided_step, layer_norm  # noqa: E402
from fastguide.ops import extension  # noqa: E402
from fastguide.ops.contract import COMBINE_SCALARS, STEP_SCALARS  # noqa: E402
from tools.occupancy import (  # noqa: E402
    KNOWN_BELOW_FLOOR,
    KNOWN_BELOW_FLOOR_TRITON,
    KNOWN_BELOW_FLOOR_UNDER,
    access_bits,
    held_to_floor,
    in_flight,
    in_flight_violations,
    loads_issued_together,
    stale_known_below_floor,
    vector_bits,
    vector_loads_only,
    vector_template,
)

TORCH_TO_TRITON = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "i32": "*i32"}


@dataclass
class Case:
    """One specialisation of one kernel: argument types by name, constexpr values."""

    name: str
    kernel: triton.JITFunction | Autotuner | Heuristics
    pointers: dict[str, str]  # pointer arg -> element type ("fp16", ...); absent ones: None
    constexprs: dict[str, object]
    num_warps: int
    main_path: bool = False  # held to the 128-bit load rule
    row_stat_loads: int = 0  # 32-bit loads that rule allows: per-row statistics, a float a row
    tensor_cores: bool = False  # held to the rule that its dots use HMMA/HGMMA
    num_stages: int = 3
    memory_bound: bool = True  # held to the in-flight floor (attention, compute-bound, is not)
    programs_per_sm: int | None = None  # a persistent grid's programs per SM (caps resident blocks)
    maxnreg: int | None = None  # the launch's register cap, where it sets one
    # tensor-descriptor arg -> (element type, box); on sm_90 held to the rule that it loads by TMA
    descriptors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


def compile_cubin(case: Case, arch: int) -> tuple[bytes, int]:
    """(cubin, dynamic shared memory bytes): the one call into triton's AOT API, which
    moves between releases."""
    kernel = case.kernel
    while isinstance(kernel, (Autotuner, Heuristics)):  # the case's constexprs stand for both
        kernel = kernel.fn
    # A constexpr the case leaves out would compile as a runtime argument: another kernel.
    missing = [q.name for q in kernel.params if q.is_constexpr and not q.name.endswith("_ptr")]
    missing = [name for name in missing if name not in case.constexprs]
    if missing:
        raise ValueError(f"case {case.name!r} gives no value for the constexprs {missing}")
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in case.constexprs:
            signature[name] = "constexpr"
        elif name in case.descriptors:
            dtype, box = case.descriptors[name]
            signature[name] = f"tensordesc<{dtype}[{','.join(map(str, box))}]>"
        elif name.endswith("_ptr"):
            if name in case.pointers:
                signature[name] = TORCH_TO_TRITON[case.pointers[name]]
                attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "constexpr"
        elif _is_float_arg(kernel, name):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {n: value for n, value in case.constexprs.items() if n in kernel.arg_names}
    constexprs.update({n: None for n, t in signature.items() if t == "constexpr" and n not in constexprs})
    if "constexprs" in inspect.signature(ASTSource).parameters:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    else:  # Triton 3.2: constants by name; its attribute descriptor (the 16-divisibility) is left out
        source = ASTSource(fn=kernel, signature=signature, constants=constexprs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    if case.maxnreg is not None:
        options["maxnreg"] = case.maxnreg
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["cubin"], compiled.metadata.shared


def _is_float_arg(kernel: triton.JITFunction, name: str) -> bool:
    return name in FLOAT_ARGS.get(kernel.__name__, ())


FLOAT_ARGS = {
    "_guided_stats_kernel": {"apg_momentum", "scale", "perturbed_scale"},
    "_coefficients_kernel": {"scale", "rescale", "apg_eta", "apg_norm_threshold"},
    # the contract's scalars, by name, and what the launcher derives from them
    "_guided_step_kernel": {
        *STEP_SCALARS,
        *COMBINE_SCALARS,
        "inv_alpha",
        "inv_sigma",
        "k_h0",
        "k_h1",
        "k_h2",
        "k_h3",
        "log_var_min",
        "log_var_max",
    },
    "_apply_kernel": {"eps"},
    "_group_kernel": {"eps"},
    "_rows_group_kernel": {"eps"},
    "_channel_maps_kernel": {"eps"},
    "_layer_norm_forward_kernel": {"eps"},
    "_forward_kernel": {"qk_scale_log2"},
    "_forward_tma_kernel": {"qk_scale_log2"},
    "_backward_dkdv_kernel": {"scale", "qk_scale_log2"},
    "_backward_dq_kernel": {"scale", "qk_scale_log2"},
}


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else (shutil.which("cuobjdump") or "cuobjdump")


def analyse_cubin(cubin: bytes) -> dict:
    """Registers, local (spill) and static shared bytes, and SASS instruction counts of a
    cubin holding one kernel (Triton's)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        (stats,) = analyse_functions(Path(f.name)).values()
    return stats


def analyse_functions(cubin: Path) -> dict[str, dict]:
    """analyse_cubin's numbers for each kernel function of a cubin, by mangled name."""
    usage = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    resources = {
        name: dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line))
        for name, line in re.findall(r"Function ([\w$.]+):\s*\n(.*)", usage)
    }
    bodies = dict(re.findall(r"Function : ([\w$.]+)\n(.*?)(?=\n\s*Function : |\Z)", sass, flags=re.S))
    # A format cuobjdump changed must fail here, not read as 0 registers and 0 spills.
    unparsed = [name for name, res in resources.items() if not {"REG", "STACK", "SHARED", "LOCAL"} <= res.keys()]
    if not resources or unparsed or resources.keys() != bodies.keys():
        raise RuntimeError(
            f"cuobjdump's output of {cubin.name} did not parse: functions {sorted(resources)} with resources, "
            f"{sorted(bodies)} with SASS; without every field: {unparsed}"
        )
    found = {}
    for name, res in resources.items():
        body = bodies[name]
        opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", body)
        widths = lambda op: Counter(access_bits(o) for o in opcodes if o.split(".")[0] == op)  # noqa: E731
        loads = dict(widths("LDG"))
        found[name] = {
            "registers": int(res["REG"]),
            "local_bytes": int(res["LOCAL"]),
            "stack_bytes": int(res["STACK"]),
            "shared_bytes": int(res["SHARED"]),
            "loads": loads,
            # of the widest loads, the most a thread issues before it uses one of them
            "loads_together": loads_issued_together(body.splitlines(), max(loads, default=128)),
            "stores": dict(widths("STG")),
            "tensor_core": sum(1 for o in opcodes if o.split(".")[0] in ("HMMA", "HGMMA", "WGMMA")),
            "tma_loads": sum(1 for o in opcodes if o.split(".")[0] == "UTMALDG"),
        }
    return found


def cases() -> list[Case]:
    """Representative specialisations of every kernel."""
    gs = guided_step
    out: list[Case] = []
    for dtype in ("fp16", "bf16", "fp32"):
        out.append(
            Case(
                f"guided_step cfg+ddim {dtype}",
                gs._guided_step_kernel,
                {"mo_ptr": dtype, "uncond_ptr": dtype, "x_ptr": dtype, "out_ptr": dtype},
                dict(
                    GUIDED=True,
                    STATS=0,
                    RESCALE=False,
                    APG_MOMENTUM=False,
                    CLIP=False,
                    GRAD_EPS=False,
                    PREDICTION=0,
                    LEARNED_VAR=False,
                    NUM_HISTORY=0,
                    HAS_NOISE=False,
                    HAS_GRAD_TERM=False,
                    OUT_2B=True,
                    HAS_X0_OUT=False,
                    BLOCK=gs.BLOCK,
                    LARGE=False,
                ),
                gs.NUM_WARPS,
                main_path=True,
            )
        )
    # CFG + DDIM asking for the similarity output: the same loads, plus each program's sums.
    out.append(
        Case(
            "guided_step cfg+ddim+similarity fp16",
            gs._guided_step_kernel,
            {
                "mo_ptr": "fp16",
                "uncond_ptr": "fp16",
                "x_ptr": "fp16",
                "out_ptr": "fp16",
                "similarity_partial_ptr": "fp32",
            },
            dict(
                GUIDED=True,
                STATS=0,
                RESCALE=False,
                APG_MOMENTUM=False,
                CLIP=False,
                GRAD_EPS=False,
                PREDICTION=0,
                LEARNED_VAR=False,
                NUM_HISTORY=0,
                HAS_NOISE=False,
                HAS_GRAD_TERM=False,
                OUT_2B=True,
                HAS_X0_OUT=False,
                BLOCK=gs.BLOCK,
                LARGE=False,
            ),
            gs.SIMILARITY_WARPS,
            main_path=True,
        )
    )
    out.append(
        Case(
            "guided_step all options fp16",
            gs._guided_step_kernel,
            {
                n: "fp16"
                for n in (
                    "mo_ptr",
                    "uncond_ptr",
                    "x_ptr",
                    "h0_ptr",
                    "h1_ptr",
                    "h2_ptr",
                    "h3_ptr",
                    "noise_ptr",
                    "grad_ptr",
                    "out_ptr",
                    "x0_ptr",
                )
            },
            dict(
                GUIDED=True,
                STATS=0,
                RESCALE=False,
                APG_MOMENTUM=False,
                CLIP=True,
                GRAD_EPS=True,
                PREDICTION=1,
                LEARNED_VAR=True,
                NUM_HISTORY=4,
                HAS_NOISE=True,
                HAS_GRAD_TERM=True,
                OUT_2B=True,
                HAS_X0_OUT=True,
                BLOCK=gs.BLOCK,
                LARGE=False,
            ),
            gs.NUM_WARPS,
        )
    )
    out.append(
        Case(
            "guided_step apg+rescale fp16",
            gs._guided_step_kernel,
            {
                "mo_ptr": "fp16",
                "uncond_ptr": "fp16",
                "x_ptr": "fp16",
                "buf_ptr": "fp32",
                "out_ptr": "fp16",
                "coefficient_ptr": "fp32",
            },
            dict(
                GUIDED=True,
                STATS=2,
                RESCALE=True,
                APG_MOMENTUM=True,
                CLIP=True,
                GRAD_EPS=False,
                PREDICTION=0,
                LEARNED_VAR=False,
                NUM_HISTORY=0,
                HAS_NOISE=False,
                HAS_GRAD_TERM=False,
                OUT_2B=True,
                HAS_X0_OUT=False,
                BLOCK=gs.BLOCK,
                LARGE=False,
            ),
            gs.NUM_WARPS,
        )
    )
    out.append(
        Case(
            "guided_step pag+rescale fp16",
            gs._guided_step_kernel,
            {
                "mo_ptr": "fp16",
                "uncond_ptr": "fp16",
                "perturbed_ptr": "fp16",
                "x_ptr": "fp16",
                "out_ptr": "fp16",
                "out_third_ptr": "fp16",
                "coefficient_ptr": "fp32",
            },
            dict(
                GUIDED=True,
                STATS=1,
                RESCALE=True,
                APG_MOMENTUM=False,
                CLIP=True,
                GRAD_EPS=False,
                PREDICTION=0,
                LEARNED_VAR=False,
                NUM_HISTORY=0,
                HAS_NOISE=False,
                HAS_GRAD_TERM=False,
                OUT_2B=True,
                HAS_X0_OUT=False,
                BLOCK=gs.BLOCK,
                LARGE=False,
            ),
            gs.NUM_WARPS,
        )
    )
    out.append(
        Case(
            "guided_step tangential+rescale fp16",
            gs._guided_step_kernel,
            {
                "mo_ptr": "fp16",
                "uncond_ptr": "fp16",
                "x_ptr": "fp16",
                "h0_ptr": "fp16",
                "out_ptr": "fp16",
                "x0_ptr": "fp16",
                "coefficient_ptr": "fp32",
            },
            dict(
                GUIDED=True,
                STATS=4,
                RESCALE=True,
                APG_MOMENTUM=False,
                CLIP=True,
                GRAD_EPS=False,
                PREDICTION=0,
                LEARNED_VAR=False,
                NUM_HISTORY=1,
                HAS_NOISE=False,
                HAS_GRAD_TERM=False,
                OUT_2B=True,
                HAS_X0_OUT=True,
                BLOCK=gs.BLOCK,
                LARGE=False,
            ),
            gs.NUM_WARPS,
        )
    )
    out.append(
        Case(
            "guided_stats apg fp16",
            gs._guided_stats_kernel,
            {"mo_ptr": "fp16", "uncond_ptr": "fp16", "buf_ptr": "fp32", "partial_ptr": "fp32"},
            dict(APG_MOMENTUM=True, PAIR_U=False, PARTS=gs.MAX_PARTS, BLOCK=gs.BLOCK, LARGE=False),
            gs.NUM_WARPS,
        )
    )
    out.append(
        Case(
            "guided_stats rescale fp16",
            gs._guided_stats_kernel,
            {"mo_ptr": "fp16", "uncond_ptr": "fp16", "partial_ptr": "fp32"},
            dict(APG_MOMENTUM=False, PAIR_U=False, PARTS=gs.MAX_PARTS, BLOCK=gs.BLOCK, LARGE=False),
            gs.NUM_WARPS,
        )
    )
    out.append(  # CFG-Zero*'s pair (c, u)
        Case(
            "guided_stats zero_star fp16",
            gs._guided_stats_kernel,
            {"mo_ptr": "fp16", "uncond_ptr": "fp16", "partial_ptr": "fp32"},
            dict(APG_MOMENTUM=False, PAIR_U=True, PARTS=gs.MAX_PARTS, BLOCK=gs.BLOCK, LARGE=False),
            gs.NUM_WARPS,
        )
    )
    # The per-sample merge of the partials into (α_c, α_v, f): one program a sample, 1 KB read.
    out.append(
        Case(
            "guided_step coefficients tangential+rescale",
            gs._coefficients_kernel,
            {"partial_ptr": "fp32", "coefficient_ptr": "fp32"},
            dict(STATS=4, RESCALE=True, PERTURBED=False, PARTS=gs.MAX_PARTS),
            1,
            memory_bound=False,
        )
    )
    gn = group_norm
    # What the launchers pick for SD-1.5's first GroupNorm (320 channels in 32 groups of a
    # 64×64 latent) at batch 2, on an H200's 132 SMs: the same call, so the same tiles.
    for layout, strides in (("nchw", {"stride_s": 1}), ("nhwc", {"stride_c": 1})):
        cfg = gn.launch_config(2, 320, 32, 64 * 64, channels_last=layout == "nhwc", multiprocessors=132)
        flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True)
        params = {"w_ptr": "fp32", "b_ptr": "fp32", "scale_ptr": "fp16", "shift_ptr": "fp16"}
        out += [
            Case(
                f"group_norm stats {layout} fp16",
                gn._stats_rows_kernel if layout == "nhwc" else gn._stats_contiguous_kernel,
                {"x_ptr": "fp16", "partial_ptr": "fp32"},
                cfg["stats"]["meta"],
                gn.NUM_WARPS,
            ),
            Case(
                f"group_norm apply+silu {layout} fp16",
                gn._apply_kernel,
                {
                    "x_ptr": "fp16",
                    "y_ptr": "fp16",
                    "partial_ptr": "fp32",
                    "mean_ptr": "fp32",
                    "rstd_ptr": "fp32",
                    **params,
                },
                {**cfg["apply"], **strides, **flags},
                gn.NUM_WARPS,
                maxnreg=gn.APPLY_MAX_REGISTERS,
            )
            if layout == "nchw"
            else Case(
                f"group_norm apply+silu {layout} fp16",
                gn._apply_rows_kernel,
                {"x_ptr": "fp16", "y_ptr": "fp16", "gain_ptr": "fp32", "offset_ptr": "fp32"},
                {**cfg["rows"]["meta"], "SILU": True},
                gn.NUM_WARPS,
            ),
            Case(
                f"group_norm bwd sums {layout} fp16",
                gn._backward_sums_kernel,
                {
                    "x_ptr": "fp16",
                    "dy_ptr": "fp16",
                    "mean_ptr": "fp32",
                    "rstd_ptr": "fp32",
                    "partial_ptr": "fp32",
                    **params,
                },
                {**cfg["backward_sums"], **strides, **flags},
                gn.NUM_WARPS,
            )
            if layout == "nchw"
            else Case(
                f"group_norm bwd sums {layout} fp16",
                gn._rows_backward_sums_kernel,
                {
                    "x_ptr": "fp16",
                    "dy_ptr": "fp16",
                    "mean_ptr": "fp32",
                    "rstd_ptr": "fp32",
                    "partial_ptr": "fp32",
                    **params,
                },
                {**cfg["backward_sums"]["meta"], **flags},
                gn.NUM_WARPS,
            ),
            Case(
                f"group_norm bwd dx {layout} fp16",
                gn._backward_dx_kernel,
                {"x_ptr": "fp16", "dy_ptr": "fp16", "dx_ptr": "fp16", "maps_ptr": "fp32", "group_terms_ptr": "fp32"},
                {**cfg["backward_dx"], **strides, **flags},
                gn.NUM_WARPS,
            )
            if layout == "nchw"
            else Case(
                f"group_norm bwd dx {layout} fp16",
                gn._rows_backward_dx_kernel,
                {"x_ptr": "fp16", "dy_ptr": "fp16", "dx_ptr": "fp16", "maps_ptr": "fp32", "group_terms_ptr": "fp32"},
                {**cfg["rows"]["meta"], "SILU": True},
                gn.NUM_WARPS,
            ),
        ]
    # The per-channel maps (channels_last's forward, both layouts' backward): a program per
    # group, O(N·C) bytes; the same SD shape, channels_last.
    cfg = gn.launch_config(2, 320, 32, 64 * 64, channels_last=True, multiprocessors=132)
    # NCHW in one pass: what the launcher picks at issue 22's large shape (64×256×64×64 in
    # 32 groups), where a group's second read comes from L2.
    fused = gn.fused_config(64, 256, 32, 64 * 64, multiprocessors=132, element_size=2, l2_budget=gn.FUSED_L2_BYTES)
    backward = gn.backward_fused_config(
        64, 256, 32, 64 * 64, multiprocessors=132, element_size=2, l2_budget=gn.FUSED_L2_BYTES
    )
    # channels_last in one pass, at the same shape, in fp16 and fp32 (whose steps take half
    # the slabs: a slab is two vectors a thread).
    for dtype, size in (("fp16", 2), ("fp32", 4)):
        rows = gn.rows_fused_config(
            64, 256, 32, 64 * 64, multiprocessors=132, element_size=size, l2_budget=gn.FUSED_L2_BYTES
        )
        out.append(
            Case(
                f"group_norm one-pass+silu nhwc {dtype}",
                gn._rows_group_kernel,
                {
                    "x_ptr": dtype,
                    "y_ptr": dtype,
                    "partial_ptr": "fp32",
                    "mean_ptr": "fp32",
                    "rstd_ptr": "fp32",
                    "maps_ptr": "fp32",
                    "ticket_ptr": "i32",
                    "done_ptr": "i32",
                    **params,
                },
                {**rows["meta"], **flags},
                gn.NUM_WARPS,
                maxnreg=gn.ROWS_FUSED_MAX_REGISTERS,
            )
        )
    out += [
        Case(
            "group_norm one-pass+silu nchw fp16",
            gn._group_kernel,
            {"x_ptr": "fp16", "y_ptr": "fp16", "mean_ptr": "fp32", "rstd_ptr": "fp32", **params},
            {**fused["meta"], **flags},
            gn.FUSED_WARPS,
            programs_per_sm=gn.FUSED_PROGRAMS_PER_SM,
        ),
        Case(
            "group_norm bwd one-pass+silu nchw fp16",
            gn._group_backward_kernel,
            {
                "x_ptr": "fp16",
                "dy_ptr": "fp16",
                "dx_ptr": "fp16",
                "mean_ptr": "fp32",
                "rstd_ptr": "fp32",
                "sums_ptr": "fp32",
                **params,
            },
            {**backward["meta"], **flags},
            gn.BACKWARD_FUSED_WARPS,
            programs_per_sm=gn.BACKWARD_FUSED_PROGRAMS_PER_SM,
        ),
        Case(
            "group_norm maps nhwc",
            gn._channel_maps_kernel,
            {
                "x_ptr": "fp16",
                "partial_ptr": "fp32",
                "mean_ptr": "fp32",
                "rstd_ptr": "fp32",
                "gain_ptr": "fp32",
                "offset_ptr": "fp32",
                **params,
            },
            {**cfg["maps"]["meta"], **flags},
            gn.NUM_WARPS,
            memory_bound=False,
        ),
        Case(
            "group_norm bwd maps nhwc",
            gn._backward_maps_kernel,
            {
                "mean_ptr": "fp32",
                "rstd_ptr": "fp32",
                "partial_ptr": "fp32",
                "sums_ptr": "fp32",
                "maps_ptr": "fp32",
                "group_terms_ptr": "fp32",
                **params,
            },
            {**cfg["backward_maps"]["meta"], **flags},
            gn.NUM_WARPS,
            memory_bound=False,
        ),
    ]
    ln = layer_norm
    # DiT-XL's D = 1152 (7 rows in 64 segments of 128), the digits transformer's D = 96 (5
    # rows in 16 segments of 32) and a narrow odd D = 72 (6 rows in 32 segments of 16): the
    # forward's tile and the backward's dx; the column sums' tile is the same at every D.
    for d, dtype in ((1152, "bf16"), (1152, "fp16"), (96, "fp16"), (72, "fp16")):
        segment, segments, rows_pow2, warps = ln.forward_tile(d)
        forward = dict(D=d, SEGMENT=segment, SEGMENTS=segments, ROWS_POW2=rows_pow2)
        dx_warps, dx_registers = ln.dx_launch(d, 2, warps)
        flags = dict(HAS_W=False, HAS_B=False, HAS_SCALE=True, HAS_SHIFT=True)
        modulation = {"scale_ptr": dtype, "shift_ptr": dtype}
        stats = {"mean_ptr": "fp32", "rstd_ptr": "fp32"}
        out += [
            Case(
                f"layer_norm adaLN fwd D={d} {dtype}",
                ln._layer_norm_forward_kernel,
                {"x_ptr": dtype, "y_ptr": dtype, **modulation, **stats},
                {**flags, **forward, "RESIDUAL": False},
                warps,
                main_path=True,
                maxnreg=ln.forward_register_cap(warps, residual=False, element_bytes=2, affine=False),
            ),
            Case(
                f"layer_norm gated residual+adaLN fwd D={d} {dtype}",
                ln._layer_norm_forward_kernel,
                {
                    "x_ptr": dtype,
                    "branch_ptr": dtype,
                    "gate_ptr": dtype,
                    "h_new_ptr": dtype,
                    "y_ptr": dtype,
                    **modulation,
                    **stats,
                },
                {**flags, **forward, "RESIDUAL": True},
                warps,
                main_path=True,
            ),
            Case(
                f"layer_norm adaLN bwd dx D={d} {dtype}",
                ln._layer_norm_dx_kernel,
                {
                    "x_ptr": dtype,
                    "dy_ptr": dtype,
                    "dx_ptr": dtype,
                    "w_ptr": "fp32",
                    "b_ptr": "fp32",
                    "scale_ptr": dtype,
                    **stats,
                },
                {**forward, **flags, "SCALE_PER_TOKEN": False, "SHIFT_PER_TOKEN": False},
                dx_warps,
                main_path=True,
                # each of a thread's segments loads its row's mean and rstd: a thread's 16-byte
                # vectors (8 of a 16-bit row, segments of at least 8) each in its own segment
                row_stat_loads=2 * segments * segment // (8 * dx_warps * 32),
                maxnreg=dx_registers,
            ),
        ]
        out.append(
            Case(
                f"layer_norm bwd column sums D={d} {dtype}",
                ln._layer_norm_column_sums_kernel,
                {"x_ptr": dtype, "dy_ptr": dtype, "scale_ptr": dtype, **stats, "partial_ptr": "fp32"},
                dict(zip(("TOKENS", "COLUMNS"), ln.column_tile(2)), D=d, HAS_SCALE=True, SCALE_PER_TOKEN=False),
                1,
                main_path=True,
                programs_per_sm=ln.COLUMN_PROGRAMS_PER_SM,  # the grid's (Triton 3.6 fits more)
            )
        )
    at = attention
    # unit head-dim strides, and the usual launch (not attention._large's: int32 offsets, a 2-D grid)
    unit_strides = {f"s{t}_d": 1 for t in ("q", "k", "v", "o", "do")} | {"LARGE": False}
    # (BLOCK_M, BLOCK_N, warps, stages): a tensor-core config, and fp32's own small tiles.
    tiles = {"fp16": (128, 64, 4, 3), "bf16": (128, 64, 4, 3), "fp32": (64, 32, 8, 2)}
    for dtype, (block_m, block_n, warps, stages) in tiles.items():
        for head_dim in (64, 128) if dtype == "fp32" else (64, 128, 256):
            if head_dim > 128:  # the pruned small-tile config
                block_m, block_n, warps, stages = 64, 32, 8, 2
            out.append(
                Case(
                    f"attention fwd D={head_dim} {dtype}",
                    at._forward_kernel,
                    {n: dtype for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")} | {"lse_ptr": "fp32"},
                    dict(
                        PRECISION="ieee",
                        EVEN_D=True,
                        EVEN_N=True,
                        BLOCK_D=head_dim,
                        BLOCK_M=block_m,
                        BLOCK_N=block_n,
                        **unit_strides,
                    ),
                    warps if head_dim == 64 else 8,
                    tensor_cores=dtype != "fp32",
                    num_stages=stages,
                    memory_bound=False,
                )
            )
    # The TMA forward at the same tensor-core tiles (it takes fp16/bf16 up to D = 128 only).
    for dtype in ("fp16", "bf16"):
        for head_dim in (64, 128):
            block_m, block_n, stages = tiles[dtype][0], tiles[dtype][1], tiles[dtype][3]
            out.append(
                Case(
                    f"attention fwd tma D={head_dim} {dtype}",
                    at._forward_tma_kernel,
                    {"lse_ptr": "fp32"},
                    dict(PRECISION="ieee", BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, **unit_strides),
                    4 if head_dim == 64 else 8,
                    tensor_cores=True,
                    num_stages=stages,
                    memory_bound=False,
                    descriptors={
                        "q_desc": (dtype, (1, 1, block_m, head_dim)),
                        "k_desc": (dtype, (1, 1, block_n, head_dim)),
                        "v_desc": (dtype, (1, 1, block_n, head_dim)),
                        "o_desc": (dtype, (1, 1, block_m, head_dim)),
                    },
                )
            )
    backward_tiles = {"fp16": (64, 64, 4, 2), "bf16": (64, 64, 4, 2), "fp32": (16, 32, 4, 1)}
    for dtype, (block_m, block_n, warps, stages) in backward_tiles.items():
        tensors = {n: dtype for n in ("q_ptr", "k_ptr", "v_ptr", "do_ptr")} | {"lse_ptr": "fp32", "delta_ptr": "fp32"}
        blocks = dict(
            PRECISION="ieee",
            EVEN_D=True,
            EVEN_M=True,
            EVEN_N=True,
            BLOCK_D=64,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            **unit_strides,
        )
        out += [
            Case(
                f"attention bwd dk,dv D=64 {dtype}",
                at._backward_dkdv_kernel,
                tensors | {"dk_ptr": dtype, "dv_ptr": dtype},
                blocks,
                warps,
                tensor_cores=dtype != "fp32",
                num_stages=stages,
                memory_bound=False,
            ),
            Case(
                f"attention bwd dq D=64 {dtype}",
                at._backward_dq_kernel,
                tensors | {"dq_ptr": dtype},
                blocks,
                warps,
                tensor_cores=dtype != "fp32",
                num_stages=stages,
                memory_bound=False,
            ),
        ]
        # Δ = rowsum(dO ∘ O) before the two: a streaming pass over O and dO, as launched
        # (64 rows a program, Triton's default 4 warps).
        out.append(
            Case(
                f"attention bwd delta D=64 {dtype}",
                at._backward_delta_kernel,
                {"o_ptr": dtype, "do_ptr": dtype, "delta_ptr": "fp32"},
                dict(BLOCK_D=64, BLOCK_M=64, LARGE=False, so_d=1, sdo_d=1),
                4,
            )
        )
    return out


def _unwrapped(kernel: object) -> object:
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def uncovered_kernels(report_cases: list[Case]) -> list[str]:
    """The Triton kernels of fastguide.kernels that no case compiles: a kernel added (or
    renamed) without a case would escape every rule of the report."""
    import fastguide.kernels

    covered = {id(_unwrapped(case.kernel)) for case in report_cases}
    modules = [
        importlib.import_module(f"fastguide.kernels.{info.name}")
        for info in pkgutil.iter_modules(fastguide.kernels.__path__)
    ]
    return sorted(
        f"{module.__name__}.{name}"
        for module in modules
        for name, value in vars(module).items()
        if isinstance(_unwrapped(value), triton.JITFunction)
        and name.endswith("_kernel")
        and id(_unwrapped(value)) not in covered
    )


def violations(case: Case, stats: dict, arch: int) -> list[str]:
    found = []
    if stats["local_bytes"] or stats["stack_bytes"]:
        found.append(f"spills: {stats['local_bytes']} B local, {stats['stack_bytes']} B stack")
    if case.main_path and not vector_loads_only(stats["loads"], case.row_stat_loads):
        found.append(f"main path global loads not all 128-bit: {stats['loads']}")
    if case.tensor_cores and not stats["tensor_core"]:
        found.append("no tensor-core instructions (HMMA/HGMMA) in the SASS")
    if case.descriptors and arch >= 90 and not stats["tma_loads"]:
        found.append("tensor descriptors but no TMA loads (UTMALDG) in the SASS")
    return found


def _triton_release() -> str:
    return ".".join(triton.__version__.split(".")[:2])


def _known_below_floor() -> set[str]:
    """KNOWN_BELOW_FLOOR with this Triton release's own entries."""
    return KNOWN_BELOW_FLOOR | KNOWN_BELOW_FLOOR_UNDER.get(_triton_release(), set())


def _is_list_triton() -> bool:
    """Whether this Triton is the one KNOWN_BELOW_FLOOR was made with."""
    return _triton_release() == KNOWN_BELOW_FLOOR_TRITON


def run(archs: list[int], only: str = "", compile_only: bool = False) -> list[dict]:
    """A row per case and architecture; with compile_only, the rules are not applied (an
    older Triton, whose SASS is not what the GPU runs, only has to compile every kernel)
    and the TMA cases are left out where this Triton has no tensor descriptors (< 3.4,
    where the launcher never takes them)."""
    rows = []
    for case in (c for c in cases() if only in c.name):
        for arch in archs:
            if case.descriptors and (arch < 90 or attention.TensorDescriptor is None):
                continue  # below sm_90 descriptors lower to plain loads, and the launcher never takes them
            cubin, shared = compile_cubin(case, arch)
            stats = analyse_cubin(cubin)
            stats["shared_bytes"] += shared
            stats |= in_flight(arch, stats, case.num_warps * 32, programs_per_sm=case.programs_per_sm)
            found = []
            if not compile_only:
                found = violations(case, stats, arch) + in_flight_violations(
                    case.name,
                    arch,
                    stats,
                    case.memory_bound,
                    list_compiler=_is_list_triton(),
                    own=KNOWN_BELOW_FLOOR_UNDER.get(_triton_release(), set()),
                )
            rows.append({"kernel": case.name, "arch": f"sm_{arch}", **stats, "violations": found})
    return rows


def _kernel_name(mangled: str) -> str:
    """'guided_step_kernel<fp16, 8, 0>' from a mangled CUDA kernel name."""
    try:
        demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    demangled = demangled.replace("(anonymous namespace)::", "")
    # Enum template arguments print as "(ns::Enum)1": keep Enum=1.
    demangled = re.sub(r"\((?:\w+::)*(\w+)\)(\d+)", r"\1=\2", demangled)
    signature = demangled.split("(")[0]
    base = signature[signature.rfind("::", 0, signature.find("<") if "<" in signature else len(signature)) + 2 :]
    for cpp, short in (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("float", "fp32")):
        base = re.sub(rf"\b{cpp}\b", short, base)
    # Template arguments of fastguide's own types without the namespace: CommonReads<false>.
    return base.replace("void ", "").replace("fastguide::", "").replace("> >", ">>")


def _vector_width(name: str) -> int:
    """The kernel's first bare integer template argument (its kVec), else 1."""
    return vector_template(name) or 1


# csrc/ kernels launched with other than their source's kThreads threads a block.
CUDA_BLOCK_THREADS = {
    "sample_coefficients_kernel": 32,  # one thread a sample, a warp a block
    "layer_norm_column_sums_kernel": 64,  # kColumnThreads
}


def cuda_violations(name: str, stats: dict) -> list[str]:
    found = []
    if stats["local_bytes"] or stats["stack_bytes"]:
        found.append(f"spills: {stats['local_bytes']} B local, {stats['stack_bytes']} B stack")
    if _vector_width(name) > 1:
        bits = vector_bits(name)
        if bits not in stats["loads"]:
            found.append(f"vectorised specialisation without {bits}-bit loads")
        writes_elements = "stats" not in name and "sums" not in name  # reductions write O(N·C)
        if writes_elements and bits not in stats["stores"]:
            found.append(f"vectorised specialisation without {bits}-bit stores")
    return found


def run_cuda(archs: list[int], only: str = "") -> list[dict]:
    """Compile each csrc/ kernel source with nvcc (warnings as errors) and analyse every kernel."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(source, arch) for source in extension.KERNEL_SOURCES if only in source for arch in archs]

        def compile_source(job: tuple[str, int]) -> Path:
            source, arch = job
            cubin = Path(tmp) / f"{source}.sm_{arch}.cubin"
            result = subprocess.run(extension.kernel_check_command(source, arch, cubin), capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"nvcc failed on csrc/{source} for sm_{arch}:\n{result.stdout}{result.stderr}")
            return cubin

        # One nvcc per core at a time: each is single-threaded, and they take most of the report's time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
            cubins = list(pool.map(compile_source, jobs))
        for (source, arch), cubin in zip(jobs, cubins):
            threads = block_threads(source)
            for mangled, stats in analyse_functions(cubin).items():
                name = _kernel_name(mangled)
                # At most the main path's vectors, where it has a cap: see CUDA_MAIN_PATH_VECTORS.
                block = CUDA_BLOCK_THREADS.get(name.split("<")[0], threads)
                stats |= in_flight(arch, stats, block, main_path_vectors(name))
                held = held_to_floor(name)
                found = cuda_violations(name, stats) + in_flight_violations(f"cuda {name}", arch, stats, held)
                rows.append({"kernel": f"cuda {name}", "arch": f"sm_{arch}", **stats, "violations": found})
    return sorted(rows, key=lambda r: (r["kernel"], r["arch"]))


# Kernels whose optional inputs are runtime branches: the 16-byte loads of their main path
# (CFG + DDIM: the conditional and unconditional predictions and x; PAG adds the perturbed
# one; the similarity sums add none), where the SASS holds the optional ones too (history,
# noise, gradient, ...). guided_step's RuntimeReads instances move one vector per input
# per thread; its CommonReads and GradReads instances have no optional load left but the
# history their slots hold, so their SASS counts (every slot in use). The report counts
# min(this, the SASS's run of loads issued together): the run may take in optional loads
# on a guarded path a common call skips (hence the cap), and the main path's own loads may
# be issued fewer at a time than it reads (hence the run).
CUDA_MAIN_PATH_VECTORS = {
    "guided_step_kernel": 3,
    "perturbed_guided_step_kernel": 4,
    "similarity_guided_step_kernel": 3,
}


def main_path_vectors(name: str) -> int | None:
    """The 16-byte loads of a CUDA kernel's main path, where its SASS would overstate them."""
    if "CommonReads" in name or "GradReads" in name:
        return None
    return CUDA_MAIN_PATH_VECTORS.get(name.split("<")[0])


def block_threads(source: str) -> int:
    """Threads per block of a csrc/ source's kernels: its ``constexpr int kThreads``."""
    found = re.search(r"constexpr int kThreads = (\d+);", (extension.source_dir() / source).read_text())
    if found is None:
        raise RuntimeError(f"csrc/{source} does not declare constexpr int kThreads: the report needs its block size")
    return int(found.group(1))


def check_bindings(torch_include: Path) -> None:
    result = subprocess.run(extension.bindings_check_command(torch_include), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"csrc/bindings.cpp does not compile against {torch_include}:\n{result.stderr}")


def format_table(rows: list[dict]) -> str:
    header = (
        "| kernel | arch | regs | spill B | smem B | global loads (bits: n) | widest loads together "
        "| global stores | tensor-core | blocks/SM | KB in flight/SM | issues |"
    )
    lines = [header, "|" + "---|" * 12]
    fmt = lambda d: " ".join(f"{w}:{n}" for w, n in sorted(d.items())) or "-"  # noqa: E731

    def loads(r: dict) -> str:
        """LDG widths, and the TMA loads (UTMALDG) where there are any."""
        tma = f"tma:{r['tma_loads']}" if r.get("tma_loads") else ""
        return " ".join(part for part in (fmt(r["loads"]) if r["loads"] else "", tma) if part) or "-"

    def together(r: dict) -> str:
        """bits:run of the widest loads, and the main path's count where that is fewer."""
        if not r["loads"]:
            return "-"
        shown = f"{max(r['loads'])}:{r['loads_together']}"
        return shown + (f" (main path {r['loads_counted']})" if r["loads_counted"] < r["loads_together"] else "")

    for r in rows:
        known = " (known below)" if f"{r['kernel']} {r['arch']}" in _known_below_floor() else ""
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['registers']} | {r['local_bytes'] + r['stack_bytes']} | "
            f"{r['shared_bytes']} | {loads(r)} | {together(r)} | {fmt(r['stores'])} | {r['tensor_core']} | "
            f"{r['blocks_per_sm']} | {r['in_flight_bytes'] / 1024:.0f}{known} | "
            f"{'; '.join(r['violations']) or 'ok'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/kernel_report.py", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM architectures (default: 80 90)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--check",
        action="store_true",
        help=(
            "exit 1 on spills, a main path or vectorised kernel without its vector-width loads, "
            "or a memory-bound kernel below the in-flight floor"
        ),
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="TEXT",
        help="only the Triton cases and csrc/ sources whose names contain TEXT (e.g. group_norm)",
    )
    parser.add_argument("--require-nvcc", action="store_true", help="fail, rather than skip csrc/, without nvcc")
    parser.add_argument("--triton-only", action="store_true", help="skip csrc/ (for a second run under another Triton)")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="only compile the Triton kernels, no rules (for the oldest Triton supported, 3.2); implies --triton-only",
    )
    parser.add_argument(
        "--torch-cuda-include",
        type=Path,
        help="torch/include of a CUDA build of torch: also check csrc/bindings.cpp against it",
    )
    args = parser.parse_args(argv)
    args.triton_only |= args.compile_only
    if args.check and not args.triton_only and not _is_list_triton():
        print(
            f"KNOWN_BELOW_FLOOR (tools/occupancy.py) was made with Triton {KNOWN_BELOW_FLOOR_TRITON}, this is "
            f"Triton {triton.__version__}: re-derive the list under it and set KNOWN_BELOW_FLOOR_TRITON "
            "(or run a second Triton with --triton-only)",
            file=sys.stderr,
        )
        return 1
    rows = run(args.arch, args.only, args.compile_only)
    print(f"Triton {triton.__version__}, compiled ahead of time (no GPU needed)\n")
    print(format_table(rows))
    if args.triton_only:
        print("\ncsrc/ skipped (--triton-only)")
    elif extension.nvcc() is not None:
        cuda = run_cuda(args.arch, args.only)
        version = subprocess.run([extension.nvcc(), "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release ([\d.]+)", version)
        print(f"\nCUDA kernels of csrc/, nvcc {release.group(1) if release else '?'} with warnings as errors\n")
        print(format_table(cuda))
        rows += cuda
    elif args.require_nvcc:
        print(
            "nvcc not found: csrc/ cannot be compiled (put the CUDA toolkit on PATH or set CUDA_HOME)", file=sys.stderr
        )
        return 1
    else:
        print("\nnvcc not found: csrc/ skipped")
    if args.torch_cuda_include:
        check_bindings(args.torch_cuda_include)
        print(f"\ncsrc/bindings.cpp compiles against {args.torch_cuda_include} (warnings as errors)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["violations"]]
    if args.check and bad:
        print(f"\n{len(bad)} kernel specialisation(s) break the rules", file=sys.stderr)
        return 1
    cuda_ran = not args.triton_only and extension.nvcc() is not None
    stale = stale_known_below_floor(rows, args.arch, cuda_ran) if args.check and not args.only else []
    if stale:
        print(f"\nKNOWN_BELOW_FLOOR names kernels the report has not: {', '.join(stale)}", file=sys.stderr)
        return 1
    uncovered = uncovered_kernels(cases()) if args.check and not args.only else []
    if uncovered:
        print(f"\nTriton kernels without a case in cases(): {', '.join(uncovered)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
