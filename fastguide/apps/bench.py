"""Run the benchmark suite for this machine and write a report.

    fastguide bench [--out DIR] [--quick] [-k EXPR] [--benchmarks DIR] [--nfe | --reuse]

Runs benchmarks/ (pytest-benchmark; GPU cases skip without CUDA) in a subprocess and
writes into DIR: results.json (pytest-benchmark's data, with GB/s, TFLOP/s, % of the
measured floor and peak memory per case), table.md (each case's implementations side
by side, as time ratios to fastguide) and one PNG bar chart per case; it prints the table.
Each case is also appended to results.partial.jsonl as it finishes: a run stopped by a
time limit (SIGTERM, as ``timeout`` sends) reports the cases it finished from there.
The suite lives in the source checkout (benchmarks/ beside fastguide/). ``--nfe`` and
``--reuse`` run instead the accuracy-per-model-call study (benchmarks/sampling/nfe.py) or
the quality-against-compute study of guidance at less than two forwards
(benchmarks/sampling/reuse.py), each writing its own files into DIR.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

from .options import Parser, UsageError, atomic_path, check_output_folder, fail

QUICK = "guided_step_cpu or group_norm_cpu"
INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C, as a shell reports SIGINT
# The file benchmarks/conftest.py appends each finished case to (JSON lines), from the environment.
PARTIAL_RESULTS = "FASTGUIDE_BENCH_PARTIAL"


def find_benchmarks() -> Path:
    candidate = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (candidate / "conftest.py").is_file():
        raise FileNotFoundError(
            "benchmarks/ not found beside the fastguide package: run from a source checkout "
            "(pip install -e .) or pass --benchmarks DIR"
        )
    return candidate


def run_suite(benchmarks: Path, out: Path, selection: str | None) -> tuple[dict, int]:
    """pytest-benchmark's data for the cases that ran, and pytest's exit status.

    A run where some cases failed still reports the others (and the caller exits non-zero);
    a run where none ran raises RuntimeError and leaves an earlier run's results.json as it
    was (pytest writes to a scratch file, which replaces results.json once a case has run).
    """
    results = out.resolve() / "results.json"  # (pytest runs from the checkout, not the caller's folder)
    running = out.resolve() / "results.running.json"
    benchmarks = benchmarks.resolve()  # (likewise: a relative one names a path from the caller's folder)
    partial = out.resolve() / "results.partial.jsonl"
    running.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(benchmarks),
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        f"--benchmark-json={running}",
    ]
    if selection:
        command += ["-k", selection]
    # Benchmarks time the tuned kernels: the tests' one-config setting stays out of the run;
    # and they run alone: a run started from a pytest-xdist worker (the tests) does not
    # inherit its worker variables, by which pytest-benchmark would disable itself.
    env = {
        name: value
        for name, value in os.environ.items()
        if name != "FASTGUIDE_AUTOTUNE" and not name.startswith("PYTEST_XDIST")
    }
    env[PARTIAL_RESULTS] = str(partial)
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        status = subprocess.run(command, cwd=benchmarks.parent, env=env).returncode
    except _Stopped:  # (subprocess.run has killed pytest)
        status = 124
        print("fastguide bench: stopped (SIGTERM); reporting the cases that finished", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C (pytest got it too, and subprocess.run has ended it)
        status = INTERRUPTED
        print("fastguide bench: interrupted; reporting the cases that finished", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        data = json.loads(running.read_text())
    except (OSError, json.JSONDecodeError):  # not written: pytest stopped before its session ended
        data = {"benchmarks": _finished_cases(partial), "partial": True}
        running.write_text(json.dumps(data, indent=2))
    if data.get("benchmarks"):
        if results.exists():
            print(f"fastguide bench: replacing the results of an earlier run in {out}", file=sys.stderr)
        os.replace(running, results)
    else:
        running.unlink(missing_ok=True)
        if status in (2, 3, 4):
            why = "pytest could not collect or run the suite"
        elif status == 1:
            why = "every selected case failed or skipped: see pytest's output above"
        elif status in (124, INTERRUPTED):
            why = "stopped before any case finished"
        else:
            why = "the selection ran nothing here: the GPU cases need CUDA, --quick selects CPU cases"
        kept = f"; the earlier results in {out} are kept" if results.exists() else ""
        raise RuntimeError(f"no benchmark ran ({why}; pytest exit {status}{kept}): {' '.join(command)}")
    return data, status


class _Stopped(Exception):
    """SIGTERM arrived while the suite ran."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped


def _finished_cases(partial: Path) -> list[dict]:
    """The cases benchmarks/conftest.py appended as each finished (a last line cut off by
    the stop is left out)."""
    cases: list[dict] = []
    try:
        lines = partial.read_text().splitlines()
    except OSError:
        return cases
    for line in lines:
        try:
            cases.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return cases


def _case_and_impl(bench: dict) -> tuple[str, str]:
    params = dict(bench.get("params") or {})
    impl = str(params.pop("impl", "-"))
    base = bench["name"].split("[")[0]
    return base + ("[" + ", ".join(f"{k}={v}" for k, v in params.items()) + "]" if params else ""), impl


def group_results(data: dict) -> dict[str, dict[str, dict]]:
    """case -> implementation -> {median_ms, rate, pct_floor, peak_MB}. A case that failed
    while it was measured (``incomplete``: its record holds a few warm-up rounds, not its
    time) is left out."""
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        case, impl = _case_and_impl(bench)
        info = bench.get("extra_info", {})
        if info.get("incomplete"):
            continue
        median_ms = info.get("median_ms", bench["stats"]["median"] * 1e3)
        rate = (
            f"{info['GB/s']:.1f} GB/s"
            if "GB/s" in info
            else f"{info['TFLOP/s']:.2f} TFLOP/s"
            if "TFLOP/s" in info
            else ""
        )
        pct = info.get("pct_of_copy_bandwidth", info.get("pct_of_matmul_rate"))
        device_pct = info.get("device_pct_of_copy_bandwidth", info.get("device_pct_of_matmul_rate"))
        cases[case][impl] = dict(
            median_ms=median_ms,
            rate=rate,
            pct=pct,
            peak=info.get("peak_memory_MB"),
            device_ms=info.get("device_ms"),
            device_pct=device_pct,
            back_to_back_ms=info.get("back_to_back_ms"),
        )
    return cases


def _is_ours(impl: str) -> bool:
    """fastguide's rows: "fastguide", or "fastguide-<backend>" where benchmarks compare backends."""
    return impl == "fastguide" or impl.startswith("fastguide-")


# The rows a ratio is taken against: what a user of fastguide can choose (the default, a
# backend, cuda_graph=True). A/B rows that hold an op to one kernel path
# ("fastguide-pointer", "fastguide-triton-three-launch") are listed beside them, not used as
# the base: a forced path faster than the default would credit fastguide with a speed its
# users do not get.
RATIO_BASES = ("fastguide", "fastguide-triton", "fastguide-cuda", "fastguide-torch", "fastguide-cuda_graph")


def _fastguide_first(impl: str) -> tuple[bool, str]:
    return (not _is_ours(impl), impl)


def _device_columns(r: dict) -> str:
    device = (
        ""
        if r.get("device_ms") is None
        else f"{r['device_ms']:.3f} ms" + ("" if r.get("device_pct") is None else f" ({r['device_pct']:.1f}%)")
    )
    back_to_back = "" if r.get("back_to_back_ms") is None else f"{r['back_to_back_ms']:.3f} ms"
    return f" {device} | {back_to_back} |"


def markdown_table(cases: dict[str, dict[str, dict]], machine: str) -> str:
    """One row per case and implementation. On a GPU, "device time" is the case's CUDA-graph
    replay (no host work; its % of the floor in brackets) beside the call's median (host
    work included, L2 flushed), and "back to back" the time per call of calls issued without
    a flush or a sync between them (benchmarks/timing.py)."""
    device = any(
        r.get("back_to_back_ms") is not None or r.get("device_ms") is not None
        for impls in cases.values()
        for r in impls.values()
    )
    lines = [
        f"Benchmarks on {machine}, {date.today().isoformat()}. Ratio: time / the fastest of fastguide's "
        "selectable rows (the default, a backend, cuda_graph=True; above 1: fastguide is faster).",
        "",
        "| case | implementation | median | rate | % of floor | peak memory | ratio to fastguide |"
        + (" device time | back to back |" if device else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if device else ""),
    ]
    for case, impls in cases.items():
        ours = min((r["median_ms"] for name, r in impls.items() if name in RATIO_BASES), default=None)
        for impl in sorted(impls, key=_fastguide_first):
            r = impls[impl]
            pct = "" if r["pct"] is None else f"{r['pct']:.1f}%"
            peak = "" if r["peak"] is None else f"{r['peak']:.0f} MB"
            ratio = "" if ours is None else f"{r['median_ms'] / ours:.2f}×"
            lines.append(
                f"| {case} | {impl} | {r['median_ms']:.3f} ms | {r['rate']} | {pct} | {peak} | {ratio} |"
                + (_device_columns(r) if device else "")
            )
    return "\n".join(lines) + "\n"


def plot_cases(cases: dict[str, dict[str, dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for case, impls in cases.items():
        names = sorted(impls, key=_fastguide_first)
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
        ax.barh(
            names,
            [impls[n]["median_ms"] for n in names],
            color=["tab:orange" if _is_ours(n) else "tab:blue" for n in names],
        )
        ax.invert_yaxis()
        ax.set_xlabel("median time (ms)")
        ax.set_title(case, fontsize=8)
        fig.tight_layout()
        path = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", case).strip("_")[:120] + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="fastguide bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results") / f"bench-{date.today().isoformat()}",
        help="folder for results.json, table.md and the plots (default: results/bench-DATE)",
    )
    parser.add_argument("--quick", action="store_true", help=f"only the fast CPU cases ({QUICK})")
    parser.add_argument("-k", dest="selection", help="pytest -k expression selecting cases")
    parser.add_argument("--benchmarks", type=Path, help="the benchmarks/ folder (default: beside the package)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--nfe",
        action="store_true",
        help="instead: accuracy per model call of every solver × spacing against diffusers' "
        "schedulers (benchmarks/sampling/nfe.py: nfe.json, nfe.md, nfe.png in --out)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="instead: quality against compute of truncated CFG, delta reuse and block caching on "
        "the digits models, beside diffusers' cache hooks (benchmarks/sampling/reuse.py: "
        "reuse.json, reuse.md, reuse.png in --out)",
    )
    args = parser.parse_args(argv)
    if args.nfe and args.reuse:
        fail("--nfe and --reuse are two separate studies: pick one")
    if (args.nfe or args.reuse) and (args.selection is not None or args.no_plots):
        option = "-k" if args.selection is not None else "--no-plots"
        fail(f"{option} applies to the benchmark suite; --{'nfe' if args.nfe else 'reuse'} runs a study without it")
    if args.benchmarks is not None and not (args.benchmarks / "conftest.py").is_file():
        fail(f"--benchmarks: expected the benchmarks/ folder of a fastguide checkout, got {args.benchmarks}")
    if args.benchmarks is not None and (args.nfe or args.reuse) and args.benchmarks.resolve().name != "benchmarks":
        # the studies import their helpers as the package benchmarks, found beside the folder
        fail(f"--benchmarks: --nfe and --reuse need the folder named benchmarks, got {args.benchmarks}")
    try:
        check_output_folder("--out", args.out)  # a folder that is or can be made, in a writable place
    except UsageError as error:
        fail(str(error))
    missing = [name for name in ("pytest", "pytest_benchmark") if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"the benchmark suite runs on {' and '.join(missing)}, not installed here: pip install 'fastguide[test]'")
    try:
        benchmarks = (args.benchmarks or find_benchmarks()).resolve()  # (a link: its target's name and parent)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.nfe or args.reuse:
            study = "nfe" if args.nfe else "reuse"
            command = [sys.executable, "-m", f"benchmarks.sampling.{study}", "--out", str(args.out.resolve())]
            return subprocess.run(command + (["--quick"] if args.quick else []), cwd=benchmarks.parent).returncode
        selection = " and ".join(f"({s})" for s in (QUICK if args.quick else None, args.selection) if s) or None
        data, status = run_suite(benchmarks, args.out, selection)
    except (FileNotFoundError, RuntimeError, OSError) as error:
        print(f"fastguide bench: {error}", file=sys.stderr)
        return 1
    cases = group_results(data)
    machine = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "this machine")
    if any("device" in b.get("extra_info", {}) and b["extra_info"]["device"] != "cpu" for b in data["benchmarks"]):
        machine = next(
            b["extra_info"]["device"] for b in data["benchmarks"] if b["extra_info"].get("device", "cpu") != "cpu"
        )
    table = markdown_table(cases, machine)
    with atomic_path(args.out / "table.md") as scratch:
        scratch.write_text(table)
    plots = not args.no_plots and importlib.util.find_spec("matplotlib") is not None
    if plots:
        plot_cases(cases, args.out)
    elif not args.no_plots:
        print("fastguide bench: plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    print(table)
    print(f"written to {args.out}/ (results.json, table.md{', *.png' if plots else ''})")
    if data.get("partial"):
        print(
            f"fastguide bench: the run stopped early; results.json holds the {len(data['benchmarks'])} cases "
            "that finished",
            file=sys.stderr,
        )
        return INTERRUPTED if status == INTERRUPTED else 1
    if status != 0:
        print(
            f"fastguide bench: some cases failed (pytest exit {status}); the table holds those that ran",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
