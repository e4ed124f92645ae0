"""How many bytes of loads a kernel keeps in flight per SM, from what a compiler reports
(registers, shared memory, the SASS of each function), against the floor that Little's law
sets for a memory-bound kernel. Used by tools/kernel_report.py; plain arithmetic and SASS
text, no GPU and no compiler needed.

A thread's bytes in flight are not every load of its SASS: a load's bytes stop being in
flight once the thread waits for them, at the first instruction that reads (or overwrites)
the registers it fills. ``loads_issued_together`` walks one function's SASS and returns the
largest run of its widest global loads (LDG.E.128 in a vectorised kernel) issued before
any of them is used; bytes per thread = width × that run. So a loop body that loads two
vectors, does math on them and then loads two more counts 2, not 4, and loads that appear
twice in the SASS (a peeled first loop pass, a tail path beside the main one) count once.
"""

from __future__ import annotations

import re
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
# rounds that up to 64 KB. (An H100's 3.35 TB/s over 132 SMs needs less: H200 decides,
# for sm_80 too, whose A100 would need about 2/3 of it.)
# What one number leaves out (2026-12-07 review; not yet modelled):
# - The bytes in flight are loads, but 3.23 and 3.5 TB/s count reads and writes: the
#   step read 3 bytes for each 2 it wrote, so its loads ran at 0.6 × 3.23 TB/s and their
#   latency was 3.4 µs. At that latency 85% of the copy rate needs r × 89 KB of loads in
#   flight per SM for a kernel whose bytes are a fraction r reads: 53 KB at the step's
#   r = 0.6, but about 89 KB for a read-only pass (GroupNorm statistics, guided_stats,
#   the backward sums, which pass here at 64-80 KB) and 45 KB for a 1:1 normalise.
# - loads_issued_together is the longest run anywhere in a function: a wide prologue or
#   peeled pass before a narrower loop counts the prologue's.
# - Resident blocks are what registers and shared memory allow; a case whose grid has
#   fewer programs than 132 × that (GroupNorm's SD-1.5 cases: 640) holds fewer.
# - cuobjdump's SHARED on sm_90 already holds the 1 KB a block reserves (sm_80's does
#   not), and occupancy() adds it again; shared memory binds no memory-bound row today.
IN_FLIGHT_FLOOR = 64 * 1024
# Memory-bound kernels below the floor (2026-12-05, Triton 3.9, nvcc 13.0), which issue
# #22's redesigns lift: too few blocks resident (registers) or too few bytes per thread.
# --check fails on any other kernel below the floor, and on one of these once above it
# (under the Triton the list was made with, KNOWN_BELOW_FLOOR_TRITON: another Triton, such
# as the GPU image's 3.6, may schedule a listed kernel above it).
KNOWN_BELOW_FLOOR_TRITON = "3.9"
KNOWN_BELOW_FLOOR: set[str] = {
    # guided_step's RuntimeReads instances (csrc/guided_step.cuh): the steps with ADM's
    # learned variance beside history or a perturbed prediction, 3-4 history tensors, a
    # classifier gradient beside history or APG momentum, or APG momentum beside more than
    # noise and two history tensors. Every optional input a runtime branch, one vector per
    # input per thread (two take 83-201 registers); the common steps' CommonReads
    # instances (reductions included), classifier guidance's GradReads and APG momentum's
    # MomentumReads are above (80-192 KB).
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
    "cuda guided_step_kernel<fp32, 4, 0, RuntimeReads> sm_80",  # 44 registers: 5 blocks, 60 KB
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
    # Triton group_norm channels_last reads whole rows of 64 channels, a thread's 16-byte
    # vectors 8 channels whose per-channel terms it holds beside the data. Apply: a step of
    # 4 vectors at 68 registers on sm_80 (7 blocks, 56 KB; 64 and 8 blocks on sm_90); a step
    # of 8 takes 128-136. Backward sums: 2 vectors each of x and dy with 4 terms a channel,
    # 95-96 registers (5 blocks, 40 KB); a step of 4 each takes 128 and the compiler issues
    # only 4-5 of them together.
    "group_norm apply+silu nhwc fp16 sm_80",
    "group_norm bwd sums nhwc fp16 sm_80",
    "group_norm bwd sums nhwc fp16 sm_90",
    # attention backward's Δ = rowsum(dO ∘ O) pass issues 2 of a thread's 8 vectors
    # together; in bf16 on sm_80, 33 registers leave 12 blocks (48 KB; 16 and 64 KB in fp16
    # and on sm_90).
    "attention bwd delta D=64 bf16 sm_80",
}
# Kernels below the floor only as another Triton release ("major.minor") compiles them,
# held under that release as KNOWN_BELOW_FLOOR's entries are under the list's (one now
# above the floor fails; one naming no kernel fails under any). The GPU image's 3.6 issues
# 4 of the Triton LayerNorm dx's 6 loads together at the narrow D=72 on sm_90 (56 KB; 3.9:
# 6, 84 KB), and gives attention's Δ pass 40 registers in fp16 on sm_80 (12 blocks, 48 KB;
# 3.9: 32, 64 KB).
KNOWN_BELOW_FLOOR_UNDER: dict[str, set[str]] = {
    "3.6": {"layer_norm adaLN bwd dx D=72 fp16 sm_90", "attention bwd delta D=64 fp16 sm_80"}
}


SUB_PARTITIONS = 4  # an SM's register file is four files, a warp's registers all in one


def occupancy(arch: int, registers: int, threads: int, shared_bytes: int) -> int:
    """Resident blocks per SM: the fewest that registers (allocated per warp in units of
    256, whole warps in each of the SM's four register files, as NVIDIA's occupancy
    calculator counts), threads, the block limit or shared memory (plus 1 KB the system
    reserves per block, rounded up to 128 bytes) allow."""
    sm = SM[arch]
    warps = -(-threads // 32)
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = (sm.registers // SUB_PARTITIONS // registers_per_warp) * SUB_PARTITIONS // warps
    by_shared = sm.shared_bytes // (-(-(shared_bytes + 1024) // 128) * 128) if shared_bytes else sm.blocks
    return min(sm.blocks, sm.threads // (warps * 32), by_registers, by_shared)


def access_bits(opcode: str) -> int:
    """Access width in bits of a load or store opcode (LDG.E.128 -> 128; no suffix -> 32)."""
    for part in opcode.split("."):
        if part in ("64", "128", "U8", "S8", "U16", "S16"):
            return {"U8": 8, "S8": 8, "U16": 16, "S16": 16}.get(part, int(part) if part.isdigit() else 32)
    return 32


def vector_loads_only(loads: dict[int, int], row_stat_loads: int = 0) -> bool:
    """Whether a main path's global loads ({bits: count}) are 16-byte vectors, but for at
    most row_stat_loads 32-bit ones: per-row statistics (a float a row, such as the mean
    and rstd a LayerNorm backward reads beside each row), whose rows a thread holds too
    few of, or too far apart, for a vector."""
    narrow = {bits: n for bits, n in loads.items() if bits != 128}
    return 128 in loads and all(bits == 32 and n <= row_stat_loads for bits, n in narrow.items())


# One SASS instruction as cuobjdump prints it: "/*0320*/  @!P0 LDG.E.128 R4, desc[UR4][R20.64] ;"
# -> address, guard predicate (or None), opcode, operands. A guarded load may be issued and a
# guarded use may wait, so both count as if they run.
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
# R0..R254 (not RZ, UR4, SR_TID or P0); ".64" marks the pair R4,R5 of a 64-bit address.
_REGISTER = re.compile(r"\bR(\d+)(\.64)?")
# The scan reads the SASS in address order, which is the order of execution only between
# jumps: an unguarded jump, call, return or exit ends a run. A guarded BRA or EXIT (@P0 EXIT,
# a bounds check after the loads are issued) does not: the threads that stay go on to the
# next instruction with their loads still in flight. A guarded call still ends the run.
_JUMPS = ("BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT")
# Their hexadecimal operands are addresses execution can arrive at from elsewhere (BSSY's and
# WARPSYNC's: where diverged threads rejoin). A run ends at any instruction there, as threads
# arriving by the jump need not have issued its loads.
_TARGETING = _JUMPS + ("BSSY", "WARPSYNC")
_DOUBLE = ("DADD", "DFMA", "DMUL", "DMNMX", "DSETP")  # fp64 arithmetic: every register a pair


def _widths(opcode: str) -> tuple[int, int]:
    """How many registers an instruction's first operand (its destination) and each of the
    others name, where the opcode says: LDG.E.128 R8 fills R8..R11, STG.E.64 [..], R4 reads
    R4,R5, DADD's operands are pairs, CS2R R12, SRZ zeroes R12 and R13, and a conversion
    names its destination type first (F2F.F64.F32: a pair from one register; a lone type is
    the side of its kind: I2F.U64 reads a pair, F2I.U64 writes one). IMAD.WIDE writes a pair."""
    parts = opcode.split(".")
    if parts[0].startswith(("LD", "ST", "ATOM", "RED")):
        data = -(-access_bits(opcode) // 32)
        return data, data
    if parts[0] in _DOUBLE:
        return 2, 2
    if parts[0] == "CS2R":
        return (1 if "32" in parts else 2), 1
    if parts[0] == "IMAD" and "WIDE" in parts:
        return 2, 1  # a 64-bit result (and addend: _registers)
    if parts[0] in ("F2F", "F2I", "I2F", "I2I"):
        types = re.findall(r"\.([FSU])(\d+)", opcode)
        if len(types) == 1 and (types[0][0] == "F") != (parts[0][2] == "F"):
            types = [("", "32"), types[0]]  # the lone type is the source's
        destination, source = (types + [("", "32")] * 2)[:2]
        return int(destination[1]) // 32 or 1, int(source[1]) // 32 or 1
    return 1, 1


def _registers(opcode: str, operands: str) -> set[int]:
    """The registers an instruction names, read or written, each operand as wide as it is."""
    destination, source = _widths(opcode)
    found = set()
    listed = operands.split(",")
    for index, operand in enumerate(listed):
        for match in _REGISTER.finditer(operand):
            if match.group(2) or "[" in operand[: match.start()]:  # an address: its own width
                count = 2 if match.group(2) else 1
            elif opcode.startswith("IMAD.WIDE") and index == len(listed) - 1:
                count = 2  # IMAD.WIDE R4, R2, R3, R6: R6,R7 added to R2 × R3
            else:
                count = source if index else destination
            first = int(match.group(1))
            found |= set(range(first, first + count))
    return found


def loads_issued_together(sass: list[str], bits: int = 128) -> int:
    """The most ``bits``-wide global loads (LDG) of one function's SASS that a thread has in
    flight together: the largest run of them issued before the first instruction that reads
    or overwrites a register any of them fills (there the thread waits for the data).

    Loads of other widths neither start nor end a run (a use of their registers is not a use
    of the run's); stores read their data operand like any other instruction. A run also ends
    at control flow (see _JUMPS and _TARGETING) and at a tensor-core or matrix-fragment
    instruction (HMMA, LDSM), whose register tuples this scan does not model.
    """
    instructions = [m.groups() for m in map(_INSTRUCTION.search, sass) if m]
    targets = {
        int(address, 16)
        for _, _, opcode, operands in instructions
        if opcode.split(".")[0] in _TARGETING
        for address in re.findall(r"0x([0-9a-f]+)", operands)
    }
    largest = run = 0
    waiting: set[int] = set()  # the registers the run's loads fill
    for address, guard, opcode, operands in instructions:
        base = opcode.split(".")[0]
        touched = _registers(opcode, operands)
        jumps = base in _JUMPS and not (guard and base in ("BRA", "EXIT"))
        unmodelled = "MMA" in base or base in ("LDSM", "STSM")
        if int(address, 16) in targets or jumps or unmodelled or touched & waiting:
            largest, run, waiting = max(largest, run), 0, set()
        if base == "LDG" and access_bits(opcode) == bits:
            run += 1
            waiting |= _registers(opcode, operands.split(",")[0])  # its destination
    return max(largest, run)


def in_flight(
    arch: int, stats: dict, threads: int, vectors: int | None = None, programs_per_sm: int | None = None
) -> dict:
    """Resident blocks per SM and the bytes of loads their threads have in flight: each thread
    its widest global loads (the data vectors; narrower loads beside them are parameters,
    a weight or a coefficient, shared by every thread and soon in cache) issued together,
    ``stats["loads_together"]`` of them (``loads_issued_together``). ``vectors``: at most
    that many of them, where the SASS also holds loads behind runtime branches that the
    common call does not take. ``programs_per_sm``: a persistent grid's programs per SM, which
    bound the resident blocks whatever the registers allow."""
    blocks = occupancy(arch, stats["registers"], threads, stats["shared_bytes"])
    if programs_per_sm is not None:
        blocks = min(blocks, programs_per_sm)
    widest = max(stats["loads"], default=0)
    together = stats["loads_together"] if vectors is None else min(vectors, stats["loads_together"])
    return {
        "threads": threads,
        "blocks_per_sm": blocks,
        "loads_counted": together,
        "in_flight_bytes": blocks * threads * widest // 8 * together,
    }


def vector_template(name: str) -> int | None:
    """A csrc/ kernel's first bare integer template argument, its kVec ('guided_step_kernel<fp16,
    8, 0, CommonReads<...>>' -> 8); None without one."""
    found = re.findall(r"(?<=[<,] )(\d+)(?=[,>])", name)
    return int(found[0]) if found else None


# csrc/ kernels whose vectors are narrower than 16 bytes: the channels_last GroupNorm
# backward sums read kVec = 2 adjacent channels (a pair) of a row a lane.
NARROW_VECTOR_KERNELS = ("channel_sums_nhwc_kernel",)
ELEMENT_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}


def vector_bits(name: str) -> int:
    """Width in bits of a vectorised csrc/ kernel's data loads (and stores): 128, 16-byte
    vectors, but in NARROW_VECTOR_KERNELS its kVec elements of its storage type (the first
    template argument): 'channel_sums_nhwc_kernel<bf16, 2>' -> 32."""
    base, _, arguments = name.partition("<")
    if base not in NARROW_VECTOR_KERNELS:
        return 128
    element = arguments.split(",")[0].strip()
    if element not in ELEMENT_BITS or vector_template(name) is None:
        raise ValueError(f"{name}: a narrow-vector kernel names its storage type and kVec first")
    return vector_template(name) * ELEMENT_BITS[element]


# csrc/ kernels that merge per-group or per-sample partials (a buffer of O(N·G) or O(N)
# floats, not a tensor of the op's size): not memory-bound, no floor.
CUDA_MERGES = ("forward_statistics_kernel", "backward_group_kernel", "sample_coefficients_kernel")


def held_to_floor(name: str) -> bool:
    """Whether a csrc/ kernel is held to the in-flight floor: every one that streams a
    tensor, but its kVec = 1 instances (they serve unaligned tensors and sizes no vector
    divides) and the merges."""
    return name.split("<")[0] not in CUDA_MERGES and vector_template(name) != 1


def stale_known_below_floor(rows: list[dict], archs: list[int], cuda_ran: bool) -> list[str]:
    """KNOWN_BELOW_FLOOR (and KNOWN_BELOW_FLOOR_UNDER) entries that name no kernel of a full
    report (every Triton case, and every csrc/ kernel when ``cuda_ran``, on ``archs``): a
    renamed or removed kernel, or a typo, which would otherwise stay on a list that must
    shrink."""
    seen = {f"{row['kernel']} {row['arch']}" for row in rows}
    return sorted(
        entry
        for entry in KNOWN_BELOW_FLOOR.union(*KNOWN_BELOW_FLOOR_UNDER.values())
        if entry not in seen and int(entry.rsplit("sm_", 1)[1]) in archs and (cuda_ran or not entry.startswith("cuda "))
    )


def in_flight_violations(
    name: str,
    arch: int,
    stats: dict,
    memory_bound: bool,
    list_compiler: bool = True,
    own: frozenset[str] | set[str] = frozenset(),
) -> list[str]:
    """A memory-bound kernel below the floor and not listed; with list_compiler (the
    compiler KNOWN_BELOW_FLOOR was made with), also a listed one now above it. ``own`` is
    the running Triton's KNOWN_BELOW_FLOOR_UNDER entries: listed too, and held to the
    floor whatever list_compiler says."""
    if not memory_bound:
        return []
    below = stats["in_flight_bytes"] < IN_FLIGHT_FLOOR
    key = f"{name} sm_{arch}"
    listed = key in KNOWN_BELOW_FLOOR or key in own
    if below and not listed:
        return [
            f"{stats['in_flight_bytes'] / 1024:.0f} KB in flight per SM, below the {IN_FLIGHT_FLOOR // 1024} KB floor"
        ]
    if listed and not below and (list_compiler or key in own):
        return [
            f"listed in KNOWN_BELOW_FLOOR but now {stats['in_flight_bytes'] / 1024:.0f} KB in flight: "
            "take it off the list"
        ]
    return []
