"""The static report's occupancy and in-flight arithmetic, against NVIDIA's occupancy rules, and its
scan of a function's SASS for the loads a thread issues before it uses any (hand-written SASS)."""

import pytest

from tools import occupancy


@pytest.mark.parametrize(
    "registers, threads, shared, blocks",
    [
        (32, 256, 0, 8),  # the thread limit: 2048 / 256
        (30, 256, 0, 8),  # registers round up to 8 a thread (256 a warp): still 32
        (64, 256, 0, 4),  # 64 × 256 × 4 = 65536
        (110, 256, 0, 2),  # 112 × 32 = 3584 a warp -> 18 warps -> 2 blocks of 8
        (255, 256, 0, 1),
        (16, 32, 0, 32),  # the block limit
        (32, 128, 100 * 1024, 2),  # shared memory: 228 KB / (100 KB + 1 KB reserved)
        # a warp's registers lie in one of the SM's four files: 88 × 32 = 2816 a warp, 5 warps
        # a file (not 65536 // 2816 = 23), so 20 one-warp blocks; 100 -> 3328, 4 a file, 8 blocks of 2
        (88, 32, 0, 20),
        (100, 64, 0, 8),
        # shared memory plus the 1 KB reserved rounds up to 128 bytes: 46624 -> 46720, 4 blocks not 5
        (32, 128, 45600, 4),
    ],
)
def test_occupancy_on_hopper(registers, threads, shared, blocks):
    assert occupancy.occupancy(90, registers, threads, shared) == blocks


def test_ampere_has_less_shared_memory():
    assert occupancy.occupancy(80, 32, 128, 100 * 1024) == 1
    assert occupancy.occupancy(90, 32, 128, 100 * 1024) == 2


def test_in_flight_bytes_and_the_floor(monkeypatch):
    # The H200 run's cuda guided_step: 4 blocks of 256 threads, three 16-byte loads in flight.
    stats = {"registers": 64, "shared_bytes": 0, "loads": {128: 3, 32: 6}, "loads_together": 3}  # c, u, x
    found = occupancy.in_flight(90, stats, threads=256)
    assert found == {"threads": 256, "blocks_per_sm": 4, "loads_counted": 3, "in_flight_bytes": 4 * 256 * 48}
    # A main-path cap counts at most its vectors, and no more than the SASS issues together.
    assert occupancy.in_flight(90, {**stats, "loads_together": 10}, threads=256, vectors=3) == found
    assert occupancy.in_flight(90, {**stats, "loads_together": 2}, threads=256, vectors=3)["loads_counted"] == 2
    # Only the widest loads count, each its own width: two 64-bit loads together are 16 bytes.
    narrow = occupancy.in_flight(90, {**stats, "loads": {64: 5, 16: 9}, "loads_together": 2}, threads=256)
    assert narrow["in_flight_bytes"] == 4 * 256 * 16
    stats |= found
    assert "below the 64 KB floor" in occupancy.in_flight_violations("k", 90, stats, memory_bound=True)[0]
    assert occupancy.in_flight_violations("k", 90, stats, memory_bound=False) == []
    monkeypatch.setattr(occupancy, "KNOWN_BELOW_FLOOR", {"k sm_90"})
    assert occupancy.in_flight_violations("k", 90, stats, memory_bound=True) == []
    stats["in_flight_bytes"] = 96 * 1024  # fixed: the list must shrink
    assert "take it off the list" in occupancy.in_flight_violations("k", 90, stats, memory_bound=True)[0]
    # ... under the compiler the list was made with; another may schedule it above the floor.
    assert occupancy.in_flight_violations("k", 90, stats, memory_bound=True, list_compiler=False) == []
    stats["in_flight_bytes"] = 16 * 1024
    assert occupancy.in_flight_violations("k", 90, stats, memory_bound=True, list_compiler=False) == []
    assert "below the 64 KB floor" in occupancy.in_flight_violations("j", 90, stats, True, list_compiler=False)[0]
    # The running Triton's own entries (KNOWN_BELOW_FLOOR_UNDER), which the report passes
    # under it: listed, and to come off once above the floor, whatever list_compiler says.
    assert occupancy.in_flight_violations("j", 90, stats, True, list_compiler=False, own={"j sm_90"}) == []
    stats["in_flight_bytes"] = 96 * 1024
    assert "take it off the list" in occupancy.in_flight_violations("j", 90, stats, True, False, own={"j sm_90"})[0]


def sass(text: str) -> list[str]:
    """cuobjdump -sass lines from "ADDRESS INSTRUCTION" lines (hex addresses, as it prints them)."""
    lines = []
    for line in text.strip().splitlines():
        address, instruction = line.split(None, 1)
        lines.append(f"        /*{int(address, 16):04x}*/                   {instruction} ;  /* 0x0000000000000000 */")
    return lines


FOUR_THEN_USE = """
    0010 LDG.E.128 R4, desc[UR4][R2.64]
    0020 LDG.E.128 R8, desc[UR4][R2.64+0x10]
    0030 LDG.E.128 R12, desc[UR4][R2.64+0x20]
    0040 LDG.E.128 R16, desc[UR4][R2.64+0x30]
    0050 FADD R20, R4, R19
    0060 EXIT
"""


def test_a_run_of_loads_issued_before_their_first_use():
    assert occupancy.loads_issued_together(sass(FOUR_THEN_USE)) == 4
    # load, use, load, use: one at a time, though the SASS holds two
    one_at_a_time = """
        0010 LDG.E.128 R4, desc[UR4][R2.64]
        0020 FFMA R20, R5, R5, R20
        0030 LDG.E.128 R8, desc[UR4][R2.64+0x10]
        0040 FFMA R20, R11, R11, R20
    """
    assert occupancy.loads_issued_together(sass(one_at_a_time)) == 1
    # a pair, math on it, then the next pair (a loop body): 2, not 4
    pairs = """
        0010 LDG.E.128 R4, desc[UR4][R2.64]
        0020 LDG.E.128 R8, desc[UR4][R2.64+0x10]
        0030 HADD2.F32 R20, -RZ, R4.H0_H0
        0040 LDG.E.128 R12, desc[UR4][R2.64+0x20]
        0050 LDG.E.128 R16, desc[UR4][R2.64+0x30]
        0060 HADD2.F32 R21, -RZ, R16.H1_H1
    """
    assert occupancy.loads_issued_together(sass(pairs)) == 2


def test_registers_as_wide_as_their_operands():
    # LDG.E.128 R8 fills R8..R11: reading R11 waits for the second load
    read_r11 = FOUR_THEN_USE.replace("0030 LDG", "0028 FADD R20, R20, R11\n0030 LDG")
    assert occupancy.loads_issued_together(sass(read_r11)) == 2
    # R2.64, the address pair R2,R3, is no loaded register: reusing and rewriting it is no use
    reused = """
        0010 LDG.E.128 R4, desc[UR4][R2.64]
        0020 IADD3 R2, P0, R2, 0x1000, RZ
        0030 IMAD.WIDE.U32 R2, R20, 0x10, R2
        0040 LDG.E.128 R8, desc[UR4][R2.64]
        0050 MOV R3, R21
        0060 LDG.E.128 R12, desc[UR4][R2.64+0x10]
    """
    assert occupancy.loads_issued_together(sass(reused)) == 3
    # a load addressed by a pair that a load filled (a pointer read from memory) waits for it
    dependent = reused.replace("[R2.64]\n        0050", "[R6.64]\n        0050")
    assert occupancy.loads_issued_together(sass(dependent)) == 2
    # a conversion to fp64 writes a pair (R24,R25) from one register: R27, not R28 of the load
    conversion = """
        0010 LDG.E R27, desc[UR4][R2.64+0x40]
        0020 LDG.E.128 R28, desc[UR4][R2.64]
        0030 F2F.F64.F32 R24, R27
        0040 LDG.E.128 R32, desc[UR4][R2.64+0x10]
    """
    assert occupancy.loads_issued_together(sass(conversion)) == 2
    # a shared-memory address [R3+0x10] is one register, whatever the width of the data
    shared = FOUR_THEN_USE.replace("0030 LDG", "0028 STS.128 [R3+0x10], R20\n0030 LDG")
    assert occupancy.loads_issued_together(sass(shared)) == 4


def test_predicated_instructions_count_as_if_they_run():
    guarded = FOUR_THEN_USE.replace("LDG", "@!P0 LDG").replace("0050 FADD", "0050 @P1 FADD")
    assert occupancy.loads_issued_together(sass(guarded)) == 4
    # a guarded use waits like any other: it ends the run
    guarded_use = FOUR_THEN_USE.replace("0030 LDG.E.128 R12", "0025 @P1 FMUL R20, R9, R9\n0030 LDG.E.128 R12")
    assert occupancy.loads_issued_together(sass(guarded_use)) == 2


def test_loads_of_other_widths_stores_and_control_flow():
    # a 32-bit load neither counts nor ends a run, and a use of its register is no use of the run's
    narrow = FOUR_THEN_USE.replace("0030 LDG", "0024 LDG.E R24, desc[UR4][R26.64]\n0028 FADD R25, R24, R24\n0030 LDG")
    assert occupancy.loads_issued_together(sass(narrow)) == 4
    # ... but one that overwrites a loaded register does
    clobber = FOUR_THEN_USE.replace("0030 LDG", "0028 LDG.E R6, desc[UR4][R26.64]\n0030 LDG")
    assert occupancy.loads_issued_together(sass(clobber)) == 2
    # a store reads its data: storing R8..R11 of the second load ends the run
    stored = FOUR_THEN_USE.replace("0030 LDG", "0028 STG.E.128 desc[UR4][R24.64], R8\n0030 LDG")
    assert occupancy.loads_issued_together(sass(stored)) == 2
    # a store whose data comes from elsewhere does not
    elsewhere = FOUR_THEN_USE.replace("0030 LDG", "0028 STG.E.64 desc[UR4][R24.64], R20\n0030 LDG")
    assert occupancy.loads_issued_together(sass(elsewhere)) == 4
    # a jump ends a run: the next instruction in the listing is not the next one run ...
    jump = FOUR_THEN_USE.replace("0030 LDG", "0028 BRA 0x40\n0030 LDG")
    assert occupancy.loads_issued_together(sass(jump)) == 2
    # ... and so does a jump's target, reached by threads that skipped the loads before it
    target = FOUR_THEN_USE.replace("0060 EXIT", "0060 @P0 BRA 0x30\n0070 EXIT")
    assert occupancy.loads_issued_together(sass(target)) == 2
    # a guarded EXIT (a bounds check) or branch leaves the threads that stay, or fall through,
    # with their loads in flight
    bounds = FOUR_THEN_USE.replace("0030 LDG", "0028 @P0 EXIT\n0030 LDG")
    assert occupancy.loads_issued_together(sass(bounds)) == 4
    assert occupancy.loads_issued_together(sass(bounds.replace("@P0 EXIT", "@!P0 BRA 0x100"))) == 4
    assert occupancy.loads_issued_together(sass(bounds.replace("@P0 EXIT", "CALL.REL.NOINC 0x100"))) == 2


def test_the_width_of_the_run():
    loads = FOUR_THEN_USE.replace("LDG.E.128 R12", "LDG.E.64 R12").replace("LDG.E.128 R16", "LDG.E.64 R16")
    assert occupancy.loads_issued_together(sass(loads)) == 2
    assert occupancy.loads_issued_together(sass(loads), bits=64) == 2
    assert occupancy.access_bits("LDG.E.128") == 128 and occupancy.access_bits("LDG.E.U16") == 16
    assert occupancy.access_bits("LDG.E") == 32 and occupancy.access_bits("STG.E.64") == 64


def test_a_stale_entry_of_the_known_list_is_named(monkeypatch):
    monkeypatch.setattr(
        occupancy, "KNOWN_BELOW_FLOOR", {"a kernel sm_80", "gone kernel sm_80", "cuda k<fp16, 8> sm_90", "b sm_90"}
    )
    monkeypatch.setattr(occupancy, "KNOWN_BELOW_FLOOR_UNDER", {})
    rows = [{"kernel": "a kernel", "arch": "sm_80"}, {"kernel": "b", "arch": "sm_90"}]
    assert occupancy.stale_known_below_floor(rows, [80, 90], cuda_ran=False) == ["gone kernel sm_80"]
    assert occupancy.stale_known_below_floor(rows, [80, 90], cuda_ran=True) == [
        "cuda k<fp16, 8> sm_90",
        "gone kernel sm_80",
    ]
    assert occupancy.stale_known_below_floor(rows, [90], cuda_ran=True) == ["cuda k<fp16, 8> sm_90"]
    # another Triton's own entries too, whichever Triton runs the report
    monkeypatch.setattr(occupancy, "KNOWN_BELOW_FLOOR_UNDER", {"3.6": {"b sm_90", "typo sm_90"}})
    assert occupancy.stale_known_below_floor(rows, [90], cuda_ran=True) == ["cuda k<fp16, 8> sm_90", "typo sm_90"]


@pytest.mark.parametrize(
    "name, held",
    [
        ("guided_step_kernel<fp16, 8, 0, CommonReads<false, false>>", True),
        ("guided_step_kernel<fp16, 1, 4, RuntimeReads>", False),  # kVec = 1: unaligned tensors
        ("channel_sums_nchw_kernel<fp16, SumsMode=0, 8>", True),
        ("layer_norm_column_sums_kernel<bf16, 8>", True),
        # no kVec template argument, yet a whole tensor streamed: held (it once was not)
        ("channel_moments_nhwc_kernel<fp16>", True),
        # merges of per-group or per-sample partials
        ("forward_statistics_kernel", False),
        ("backward_group_kernel", False),
        ("sample_coefficients_kernel<true>", False),
    ],
)
def test_every_csrc_kernel_that_streams_a_tensor_is_held_to_the_floor(name, held):
    assert occupancy.held_to_floor(name) is held


@pytest.mark.parametrize(
    "name, bits",
    [
        ("guided_step_kernel<fp16, 8, 0, CommonReads<false, false>>", 128),
        ("normalize_kernel<fp32, 4, true>", 128),
        # every kernel but the narrow ones is held to 16-byte vectors, whatever its kVec
        ("layer_norm_forward_kernel<fp16, 4, true>", 128),
        # the channels_last backward sums read channel pairs
        ("channel_sums_nhwc_kernel<bf16, 2>", 32),
        ("channel_sums_nhwc_kernel<fp32, 2>", 64),
    ],
)
def test_vectorised_kernels_are_held_to_their_vector_width(name, bits):
    assert occupancy.vector_bits(name) == bits


def test_a_narrow_vector_kernel_must_name_its_type_and_width():
    with pytest.raises(ValueError, match="storage type and kVec"):
        occupancy.vector_bits("channel_sums_nhwc_kernel<T, SumsMode=1>")


@pytest.mark.parametrize(
    "loads, row_stat_loads, ok",
    [
        ({128: 10}, 0, True),
        ({128: 10, 32: 4}, 0, False),  # scalar loads on a main path
        ({128: 10, 32: 4}, 4, True),  # a float a row of statistics, as the case allows
        ({128: 10, 32: 5}, 4, False),  # more than it allows
        ({128: 10, 64: 1}, 4, False),  # the allowance is for 32-bit floats alone
        ({32: 2}, 4, False),  # no vector loads at all
    ],
)
def test_main_path_loads_are_vectors_but_for_allowed_row_statistics(loads, row_stat_loads, ok):
    assert occupancy.vector_loads_only(loads, row_stat_loads) is ok
