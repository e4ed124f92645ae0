"""How many bytes of loads a kernel keeps in flight per SM, from what a compiler reports
(registers, shared memory, the LDG instructions of its SASS), against the floor that
Little's law sets for a memory-bound kernel. Used by tools/kernel_report.py; plain
arithmetic, no GPU and no compiler needed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Multiprocessor:
    """What one SM holds (CUDA programming guide, compute capability tables)."""

    registers: int = 65536
    threads: int = 2048
    blocks: int = 32
    shared_bytes: int = 228 * 1024


SM = {80: Multiprocessor(shared_bytes=164 * 1024), 90: Multiprocessor()}
# Little's law for HBM: bytes in flight per SM = bandwidth × latency / SMs. The H200 run
# (2026-11-26) gives the latency under load: guided_step's cuda kernel had
# 49 KB in flight per SM (4 blocks of 256 threads × three 16-byte loads) and moved
# 3.23 TB/s, so latency = 49 KB × 132 / 3.23 TB/s ≈ 2.0 µs. 85% of the measured 4.13 TB/s
# copy rate at that latency needs 3.5 TB/s × 2.0 µs / 132 ≈ 53 KB per SM; the floor
# rounds that up to 64 KB. (An H100's 3.35 TB/s over 132 SMs needs less: H200 decides.)
IN_FLIGHT_FLOOR = 64 * 1024
# Memory-bound kernels below the floor (2026-12-04, Triton 3.9, nvcc 13.0), which issue
# #22's redesigns lift: too few blocks resident (registers) or too few bytes per thread.
# --check fails on any other kernel below the floor, and on one of these once above it.
KNOWN_BELOW_FLOOR: set[str] = {
    # guided_step's RuntimeReads instances (csrc/guided_step.cuh): the variants with a
    # reduction, APG momentum, a classifier gradient or ADM's learned variance with noise.
    # Every optional input a runtime branch, one vector per input per thread (two would
    # halve the blocks an SM holds); the common steps' CommonReads instances are above.
    "cuda guided_step_kernel<bf16, 8, 0, RuntimeReads> sm_80",
    "cuda guided_step_kernel<bf16, 8, 0, RuntimeReads> sm_90",
    "cuda guided_step_kernel<bf16, 8, 2, RuntimeReads> sm_80",
    "cuda guided_step_kernel<bf16, 8, 2, RuntimeReads> sm_90",
    "cuda guided_step_kernel<bf16, 8, 4, RuntimeReads> sm_80",
    "cuda guided_step_kernel<bf16, 8, 4, RuntimeReads> sm_90",
    "cuda guided_step_kernel<fp16, 8, 0, RuntimeReads> sm_80",
    "cuda guided_step_kernel<fp16, 8, 0, RuntimeReads> sm_90",
    "cuda guided_step_kernel<fp16, 8, 2, RuntimeReads> sm_80",
    "cuda guided_step_kernel<fp16, 8, 2, RuntimeReads> sm_90",
    "cuda guided_step_kernel<fp16, 8, 4, RuntimeReads> sm_80",
    "cuda guided_step_kernel<fp16, 8, 4, RuntimeReads> sm_90",
    "cuda guided_step_kernel<fp32, 4, 0, RuntimeReads> sm_80",
    "cuda guided_step_kernel<fp32, 4, 0, RuntimeReads> sm_90",
    "cuda guided_step_kernel<fp32, 4, 2, RuntimeReads> sm_80",
    "cuda guided_step_kernel<fp32, 4, 2, RuntimeReads> sm_90",
    "cuda guided_step_kernel<fp32, 4, 4, RuntimeReads> sm_80",
    "cuda guided_step_kernel<fp32, 4, 4, RuntimeReads> sm_90",
    "cuda perturbed_guided_step_kernel<bf16, 8, 4, RuntimeReads> sm_80",
    "cuda perturbed_guided_step_kernel<bf16, 8, 4, RuntimeReads> sm_90",
    "cuda perturbed_guided_step_kernel<fp16, 8, 4, RuntimeReads> sm_80",
    "cuda perturbed_guided_step_kernel<fp16, 8, 4, RuntimeReads> sm_90",
    "cuda similarity_guided_step_kernel<bf16, 8, 4, RuntimeReads> sm_80",
    "cuda similarity_guided_step_kernel<bf16, 8, 4, RuntimeReads> sm_90",
    "cuda similarity_guided_step_kernel<fp16, 8, 4, RuntimeReads> sm_80",
    "cuda similarity_guided_step_kernel<fp16, 8, 4, RuntimeReads> sm_90",
    "cuda similarity_guided_step_kernel<fp32, 4, 4, RuntimeReads> sm_80",
    "cuda similarity_guided_step_kernel<fp32, 4, 4, RuntimeReads> sm_90",
    "layer_norm adaLN bwd D=72 fp16 sm_80",
}


def occupancy(arch: int, registers: int, threads: int, shared_bytes: int) -> int:
    """Resident blocks per SM: the fewest that registers (allocated per warp in units of
    256), threads, the block limit or shared memory (plus 1 KB the system reserves per
    block) allow."""
    sm = SM[arch]
    warps = -(-threads // 32)
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (sm.registers // registers_per_warp) // warps
    by_shared = sm.shared_bytes // (shared_bytes + 1024) if shared_bytes else sm.blocks
    return min(sm.blocks, sm.threads // (warps * 32), by_registers, by_shared)


def load_bytes_per_thread(loads: dict[int, int]) -> int:
    """Bytes of data one thread loads: its widest global loads (the data vectors), Σ width/8
    over them; narrower loads beside them are parameters (a weight, a coefficient), whose
    few bytes are shared by every thread and soon in cache."""
    widest = max(loads, default=0)
    return widest // 8 * loads.get(widest, 0)


def in_flight(arch: int, stats: dict, threads: int, vectors: int | None = None) -> dict:
    """Resident blocks per SM and the bytes of loads their threads have in flight.
    ``vectors``: the 16-byte loads of a thread's main path, where the SASS also holds
    loads behind runtime branches (counted from the SASS otherwise)."""
    blocks = occupancy(arch, stats["registers"], threads, stats["shared_bytes"])
    per_thread = 16 * vectors if vectors is not None else load_bytes_per_thread(stats["loads"])
    return {"threads": threads, "blocks_per_sm": blocks, "in_flight_bytes": blocks * threads * per_thread}


def in_flight_violations(name: str, arch: int, stats: dict, memory_bound: bool) -> list[str]:
    if not memory_bound:
        return []
    below = stats["in_flight_bytes"] < IN_FLIGHT_FLOOR
    known = f"{name} sm_{arch}" in KNOWN_BELOW_FLOOR
    if below and not known:
        return [
            f"{stats['in_flight_bytes'] / 1024:.0f} KB in flight per SM, below the {IN_FLIGHT_FLOOR // 1024} KB floor"
        ]
    if known and not below:
        return [
            f"listed in KNOWN_BELOW_FLOOR but now {stats['in_flight_bytes'] / 1024:.0f} KB in flight: "
            "take it off the list"
        ]
    return []
