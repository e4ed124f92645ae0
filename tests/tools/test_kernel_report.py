"""tools/kernel_report.py's own checks, run in a subprocess: importing the report turns the
Triton interpreter off for its process (it compiles for real GPUs), which the rest of the
suite needs on."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_in_report(code: str) -> subprocess.CompletedProcess:
    script = "from tools import kernel_report as report\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_triton_kernel_has_a_case():
    # A kernel without a case escaped every rule: attention's Δ pass had none.
    result = run_in_report(
        """
        cases = report.cases()
        assert report.uncovered_kernels(cases) == [], report.uncovered_kernels(cases)
        without = [case for case in cases if "delta" not in case.name]
        assert report.uncovered_kernels(without) == ["fastguide.kernels.attention._backward_delta_kernel"]
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_cuobjdump_output_that_does_not_parse_fails():
    # Missing fields read as 0 registers and 0 spills, and a function without SASS as one
    # without loads: each passed the rules. Now each raises.
    result = run_in_report(
        """
        from pathlib import Path
        from types import SimpleNamespace

        good_usage = "Function k:\\nREG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400\\n"
        sass = "Function : k\\n/*0000*/ LDG.E.128 R4, desc[UR4][R2.64] ;\\n/*0010*/ EXIT ;\\n"
        outputs = {}
        report.subprocess.run = lambda command, **kw: SimpleNamespace(stdout=outputs[command[1]])
        report._cuobjdump = lambda: "cuobjdump"
        outputs.update({"--dump-resource-usage": good_usage, "-sass": sass})
        assert report.analyse_functions(Path("k.cubin"))["k"]["registers"] == 32
        for usage, code in (
            ("Function k:\\nREGISTERS:32 STACK:0 SHARED:0 LOCAL:0\\n", sass),  # a renamed field
            (good_usage, sass.replace("Function : k", "Function : other")),  # SASS of another name
            ("", ""),  # nothing
        ):
            outputs.update({"--dump-resource-usage": usage, "-sass": code})
            try:
                report.analyse_functions(Path("k.cubin"))
            except RuntimeError as error:
                assert "did not parse" in str(error)
            else:
                raise AssertionError(f"parsed: {usage!r}")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_case_without_one_of_its_constexprs_fails():
    # A constexpr the case left out compiled as a runtime i32 argument, so the report
    # measured a kernel that never runs (guided_stats without PAIR_U did).
    result = run_in_report(
        """
        import dataclasses
        case = next(c for c in report.cases() if c.name == "guided_stats zero_star fp16")
        constexprs = {k: v for k, v in case.constexprs.items() if k != "PAIR_U"}
        try:
            report.compile_cubin(dataclasses.replace(case, constexprs=constexprs), 90)
        except ValueError as error:
            assert "PAIR_U" in str(error), error
        else:
            raise AssertionError("compiled without PAIR_U")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
