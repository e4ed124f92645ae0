"""Ids defined once: the CUDA header's enums carry the values of their Python definitions
(ops/layout.py's STATS_*, ops/contract.py's PREDICTION_TYPES), which the Triton kernel and
both launchers take; the extension's sources and flags come from ops/extension.py alone."""

import re
from pathlib import Path

from fastguide.ops import contract, extension, layout

ROOT = Path(__file__).resolve().parents[2]
HEADER = (ROOT / "csrc" / "guided_step.cuh").read_text()


def cpp_enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name} : int \{{(.*?)\}};", HEADER, flags=re.S)
    assert body, f"enum {name} not found in csrc/guided_step.cuh"
    return {key: int(value) for key, value in re.findall(r"(k\w+) = (\d+)", body.group(1))}


def snake(cpp_name: str, prefix: str) -> str:
    """kStatsZeroStar -> zero_star (prefix "kStats"), kVPrediction -> v_prediction."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name.removeprefix(prefix)).lower()


def test_guidance_stats_ids_match():
    python = {
        name.removeprefix("STATS_").lower(): value for name, value in vars(layout).items() if name.startswith("STATS_")
    }
    cpp = {snake(name, "kStats"): value for name, value in cpp_enum("GuidedStats").items()}
    assert cpp == python and len(python) == 5


def test_prediction_ids_match():
    cpp = {snake(name, "k"): value for name, value in cpp_enum("PredictionType").items()}
    assert cpp == {name: index for index, name in enumerate(contract.PREDICTION_TYPES)}


def test_setup_builds_the_sources_and_flags_of_the_just_in_time_build():
    setup = (ROOT / "setup.py").read_text()
    assert "KERNEL_SOURCES" in setup and "BINDING_SOURCES" in setup and "NVCC_FLAGS" in setup
    assert not re.search(r"\.cu\b|\.cpp\b|-O3|--use_fast_math|-std=", setup.split('"""', 2)[2]), (
        "setup.py must take its sources and flags from fastguide/ops/extension.py"
    )
    on_disk = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp")}
    assert on_disk == set(extension.KERNEL_SOURCES + extension.BINDING_SOURCES)
