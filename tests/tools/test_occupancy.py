"""The static report's occupancy and in-flight arithmetic, against NVIDIA's occupancy rules."""

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
    ],
)
def test_occupancy_on_hopper(registers, threads, shared, blocks):
    assert occupancy.occupancy(90, registers, threads, shared) == blocks


def test_ampere_has_less_shared_memory():
    assert occupancy.occupancy(80, 32, 128, 100 * 1024) == 1
    assert occupancy.occupancy(90, 32, 128, 100 * 1024) == 2


def test_in_flight_bytes_and_the_floor(monkeypatch):
    # The H200 run's cuda guided_step: 4 blocks of 256 threads, three 16-byte loads each.
    stats = {"registers": 64, "shared_bytes": 0, "loads": {128: 3, 32: 6}}  # c, u, x and six scalars
    found = occupancy.in_flight(90, stats, threads=256)
    assert occupancy.in_flight(90, {**stats, "loads": {128: 10, 32: 6}}, threads=256, vectors=3) == found
    assert found == {"threads": 256, "blocks_per_sm": 4, "in_flight_bytes": 4 * 256 * 48}
    stats |= found
    assert "below the 64 KB floor" in occupancy.in_flight_violations("k", 90, stats, memory_bound=True)[0]
    assert occupancy.in_flight_violations("k", 90, stats, memory_bound=False) == []
    monkeypatch.setattr(occupancy, "KNOWN_BELOW_FLOOR", {"k sm_90"})
    assert occupancy.in_flight_violations("k", 90, stats, memory_bound=True) == []
    stats["in_flight_bytes"] = 96 * 1024  # fixed: the list must shrink
    assert "take it off the list" in occupancy.in_flight_violations("k", 90, stats, memory_bound=True)[0]
    assert occupancy.load_bytes_per_thread({128: 2, 32: 3, 16: 1}) == 32
    assert occupancy.load_bytes_per_thread({16: 4, 32: 15}) == 60 and occupancy.load_bytes_per_thread({}) == 0
