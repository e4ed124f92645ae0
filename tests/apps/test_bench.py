"""The benchmark suite's tooling does not rot: the report command and the one-shot GPU script."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import fastguide
from fastguide.apps import bench, cli
from tests.helpers import release

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_report(tmp_path):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    impls = {b["params"]["impl"] for b in data["benchmarks"]}
    assert {"fastguide", "eager", "torch.compile"} <= impls
    assert all("GB/s" in b["extra_info"] and "peak_memory_MB" in b["extra_info"] for b in data["benchmarks"])
    table = (tmp_path / "table.md").read_text()
    assert "| fastguide |" in table and "1.00×" in table
    assert len(list(tmp_path.glob("*.png"))) == len(bench.group_results(data))
    # each case was also appended as it finished, for a run stopped before its end
    finished = (tmp_path / "results.partial.jsonl").read_text().splitlines()
    names = sorted(b["fullname"] for b in data["benchmarks"])
    assert sorted(json.loads(line)["fullname"] for line in finished) == names


@pytest.mark.parametrize(
    "stop, status, said", [(signal.SIGTERM, 1, "stopped early"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_stopped_run_reports_the_cases_it_finished(tmp_path, stop, status, said):
    """SIGTERM (a time limit) or Ctrl-C while the suite runs: the table holds the finished
    cases, the exit status says the run stopped (Ctrl-C's as a shell reports it)."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom benchmarks.conftest import _append_finished_case\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\npython_files = bench_*.py\n")
    (suite / "bench_slow.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.parametrize('impl', ['fastguide', 'eager'])\n"
        "def test_sum(benchmark, impl):\n"
        "    benchmark(sum, range(100))\n\n"
        "def test_hangs(benchmark):\n"
        "    time.sleep(600)\n"
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastguide", "bench", "--benchmarks", str(suite), "--out", str(out), "--no-plots"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as run:
        partial = out / "results.partial.jsonl"
        deadline = time.monotonic() + 120
        while not (partial.is_file() and len(partial.read_text().splitlines()) == 2):
            assert time.monotonic() < deadline and run.poll() is None, "the two quick cases did not finish"
            time.sleep(0.2)
        run.send_signal(stop)
        stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == status and said in stderr and "Traceback" not in stderr
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] and sorted(b["params"]["impl"] for b in data["benchmarks"]) == ["eager", "fastguide"]
    assert "| fastguide |" in (out / "table.md").read_text()


def test_reuse_study_at_its_reduced_size(tmp_path):
    """fastguide bench --reuse --quick: every method on both digits networks, beside
    diffusers' hooks on the transformer, its compute counted exactly."""
    assert cli.main(["bench", "--reuse", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "reuse.json").read_text())["rows"]
    methods = {(r["model"], r["method"]) for r in rows}
    for model in ("digits UNet", "digits transformer"):
        for method in ("CFG", "CFG, fewer steps", "truncated CFG", "delta reuse", "FirstBlockCache"):
            assert (model, method) in methods
    # The peers' rows wherever the peer has the feature (diffusers' cache hooks from 0.35; the
    # test extra installs both): a peer whose import broke would lose its rows silently.
    hooks = release("diffusers") >= (0, 35)
    assert (("digits transformer", "diffusers FirstBlockCacheConfig") in methods) == hooks
    assert (("digits transformer", "diffusers MagCacheConfig") in methods) == hooks  # ratios calibrated on the run
    assert (("digits transformer", "cache-dit DBCache") in methods) == (hooks and release("cache-dit") > (0,))
    compute = {(r["model"], r["method"]): r["compute"] for r in rows}
    assert compute[("digits UNet", "CFG")] == 1.0
    assert compute[("digits UNet", "CFG, fewer steps")] == 13 / 25
    # every 2nd guided call of 25 runs the unconditional rows: 13 · 2B + 12 · B rows of 25 · 2B
    assert compute[("digits transformer", "delta reuse")] == (13 * 2 + 12) / 50
    assert all(0 < r["compute"] <= 1 and r["deviation"] >= 0 for r in rows)
    assert (tmp_path / "reuse.md").read_text().count("### ") == 2 and (tmp_path / "reuse.png").is_file()


def test_loop_profile_counts_both_eager_loops(tmp_path):
    """benchmarks/sampling/loop_profile.py (gpu.sh runs it): both loops timed and profiled,
    on the same model, with the operators that hold the host's time listed per loop."""
    pytest.importorskip("diffusers")
    from benchmarks.sampling import loop_profile

    # The top 20 operators by self time: under a loaded CI machine the convolutions slow
    # more than the Python around them, and the op's own time fell out of a top 5.
    report = loop_profile.main(["--pairs", "1", "--steps", "2", "--top", "20", "--out", str(tmp_path)])
    assert report == (tmp_path / "loop_profile.md").read_text()
    loops = {line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")}
    assert {"fastguide", "diffusers"} <= loops
    assert report.count("Self CPU") >= 2 and "fastguide::group_norm" in report


def test_host_path_splits_each_op_call_into_fastguides_part_and_the_backends(capsys):
    from benchmarks.ops import host_path
    from fastguide.ops import reference

    functions = {name: getattr(reference, name) for name in host_path.BACKEND_FUNCTIONS.values()}
    host_path.main(["--device", "cpu", "--calls", "20", "--rounds", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if "| torch |" in line]
    assert len(rows) == len(host_path.cases(torch.device("cpu"))) == 6
    assert all(float(value) > 0 for row in rows for value in row[2:])
    assert all(getattr(reference, name) is function for name, function in functions.items())  # stubs removed


def test_host_path_times_fastguides_part_without_running_the_backend(monkeypatch):
    # The third column's call runs everything of the op but the backend's function, which a
    # stub replaces: the real one is not called, and the op still returns its results.
    from benchmarks.ops import host_path
    from fastguide.ops import reference

    calls = []
    real = reference.layer_norm_forward
    monkeypatch.setattr(reference, "layer_norm_forward", lambda *args: calls.append(1) or real(*args))
    op, call, _ = host_path.cases(torch.device("cpu"))["layer_norm (+ adaLN scale, shift)"]
    direct, stubbed = host_path.backend_call(op, "torch", call)
    calls.clear()
    torch.testing.assert_close(stubbed(), call())
    assert calls == [1]  # the plain call's, not the stubbed one's
    direct()
    assert calls == [1, 1]


def test_host_path_peer_column_computes_what_the_op_computes():
    # The eager-PyTorch column is the peer only if it does the op's work: the same results.
    from benchmarks.ops import host_path

    with torch.no_grad():
        for label, (_, call, eager) in host_path.cases(torch.device("cpu")).items():
            ours = call().clone()  # (guided_step's is its out tensor, which eager rewrites)
            torch.testing.assert_close(eager(), ours, msg=label)


def gpu_script_dry_run(tmp_path, **env: str) -> str:
    """What ``benchmarks/gpu.sh OUT --dry-run`` prints, under this Python."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SH_")}
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        env={**environment, "PYTHON": sys.executable, **env},
        check=True,
    )
    return result.stdout


def pytest_lines(stdout: str) -> list[str]:
    """The dry run's test steps (the GPU-marked tests, the backend-parametrised op tests)."""
    lines = [line for line in stdout.splitlines() if " -m pytest tests" in line]
    assert len(lines) == 2, stdout
    return lines


def test_gpu_script_dry_run_finds_every_test_and_benchmark(tmp_path):
    stdout = gpu_script_dry_run(tmp_path)
    found = re.search(r"collected: (\d+) tests, (\d+) of them GPU-marked, (\d+) benchmarks", stdout)
    assert found, stdout
    tests, gpu_tests, benchmarks = map(int, found.groups())
    assert tests > 500 and gpu_tests > 50 and benchmarks > 100, stdout
    assert "-m fastguide bench" in stdout
    # The tests run in 8 pytest-xdist workers where xdist imports; the benchmarks, which
    # time, in one process.
    if importlib.util.find_spec("xdist") is not None:
        assert all(" -n 8 " in line for line in pytest_lines(stdout))
    assert not any(" -n " in line for line in stdout.splitlines() if "fastguide bench" in line)


def test_gpu_script_ends_within_its_time_from_its_start_and_packs_what_it_finished(tmp_path):
    # Its time was counted from after the install and the CUDA build: the run outlasted
    # the device tool's call by that much, which killed it before the packing after it, so
    # nothing came back. A stand-in interpreter: the two installs take 5 s each, every other
    # step would take a minute.
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'case "$*" in\n'
        '  "-m pip install"*) exec sleep 5 ;;\n'
        "  -c*) exit 0 ;;\n"
        '  *) echo "$*" >> "$OUT_DIR/ran.txt"; exec sleep 60 ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    out, pack = tmp_path / "fg", tmp_path / "back" / "gpu-results.tgz"
    pack.parent.mkdir()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SH_")}
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**environment, "PYTHON": str(fake), "OUT_DIR": str(out), "GPU_SH_TIME": "46", "GPU_SH_PACK": str(pack)},
        timeout=120,
    )
    elapsed = time.monotonic() - start
    # (46 − 15 s kept for the packing: 31 s from its start; counted from after the installs, 41)
    assert elapsed < 37, (elapsed, result.stderr)
    assert "no time left (GPU_SH_TIME): skipped" in result.stdout + result.stderr
    ran = (out / "ran.txt").read_text().splitlines()
    assert ran and "selfcheck" in ran[0]  # the first step after the installs, stopped by the deadline
    import tarfile

    with tarfile.open(pack) as packed:
        assert "fg/ran.txt" in packed.getnames()


def test_gpu_script_runs_the_tests_in_one_process_when_told(tmp_path):
    assert not any(" -n " in line for line in pytest_lines(gpu_script_dry_run(tmp_path, GPU_SH_TEST_WORKERS="0")))


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--bogus"], "unrecognized arguments"),
        (["--benchmarks", "{tmp}"], "--benchmarks"),
        (["--out", "{tmp}/file"], "--out"),
        (["--out", "{tmp}/file/results"], "--out: expected a path in a folder"),
    ],
)
def test_bench_bad_options_exit_2_with_one_line(argv, option, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastguide: error:") and option in lines[0]


def test_a_study_needs_its_suite_folder_named_benchmarks(tmp_path, capsys):
    # the studies run as the module benchmarks.sampling.<study>: another name cannot import
    suite = tmp_path / "mybench"
    suite.mkdir()
    (suite / "conftest.py").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--nfe", "--quick", "--benchmarks", str(suite), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "--nfe and --reuse need the folder named benchmarks" in capsys.readouterr().err


def test_bench_takes_one_study_at_a_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--nfe", "--reuse", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "pick one" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["-k", "attention"], ["--no-plots"]], ids=["-k", "--no-plots"])
def test_bench_refuses_suite_options_beside_a_study(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--nfe", *option, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and f"{option[0]} applies to the benchmark suite" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_bench_refuses_an_out_folder_it_cannot_create(capsys):
    # /proc takes no new folders, not even from root (mkdir fails with ENOENT there).
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", "/proc/fastguide-bench/results"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastguide: error: --out: cannot write in folder /proc")


def test_bench_with_no_case_selected_says_so(tmp_path, capsys):
    assert bench.main(["-k", "no_such_case", "--out", str(tmp_path), "--no-plots"]) == 1
    assert "no benchmark ran" in capsys.readouterr().err


def tiny_suite(folder: Path, bench_files: dict[str, str]) -> Path:
    """A benchmarks/ folder in ``folder`` (with the pytest.ini that collects bench_*.py)
    holding ``bench_files`` (name -> source)."""
    suite = folder / "benchmarks"
    suite.mkdir(parents=True)
    (suite / "conftest.py").write_text("")
    (folder / "pytest.ini").write_text("[pytest]\npython_files = bench_*.py\n")
    for name, source in bench_files.items():
        (suite / name).write_text(source)
    return suite


ONE_CASE = {"bench_one.py": "def test_sum(benchmark):\n    benchmark(sum, range(10))\n"}


def test_bench_whose_every_case_failed_says_so(tmp_path, capsys):
    suite = tiny_suite(tmp_path, {"bench_broken.py": "def test_broken(benchmark):\n    raise RuntimeError('no')\n"})
    assert bench.main(["--benchmarks", str(suite), "--out", str(tmp_path / "out"), "--no-plots"]) == 1
    assert "every selected case failed or skipped" in capsys.readouterr().err


def test_bench_without_matplotlib_skips_its_plots(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name))
    suite = tiny_suite(tmp_path, ONE_CASE)
    assert bench.main(["--benchmarks", str(suite), "--out", str(tmp_path / "out")]) == 0
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png")) and (tmp_path / "out" / "table.md").is_file()


def test_bench_reports_the_cases_that_ran_when_others_fail(tmp_path, capsys):
    # A failing case (one SDPA backend, one dtype on one GPU) must not lose the others' numbers.
    suite = tiny_suite(
        tmp_path,
        {
            "bench_mixed.py": "import pytest\n\n"
            "@pytest.mark.parametrize('impl', ['fastguide', 'eager'])\n"
            "def test_sum(benchmark, impl):\n"
            "    benchmark(sum, range(100))\n\n"
            "def test_broken(benchmark):\n"
            "    raise RuntimeError('this case cannot run here')\n"
        },
    )
    out = tmp_path / "out"
    assert bench.main(["--benchmarks", str(suite), "--out", str(out), "--no-plots"]) == 1
    captured = capsys.readouterr()
    assert "some cases failed" in captured.err
    table = (out / "table.md").read_text()
    assert "| fastguide |" in table and "| eager |" in table


@pytest.mark.parametrize("relative_suite", [False, True], ids=["absolute --benchmarks", "relative --benchmarks"])
def test_bench_takes_folders_relative_to_the_callers_folder(tmp_path, monkeypatch, capsys, relative_suite):
    """pytest runs from the checkout: the results land in the caller's --out all the same,
    and a relative --benchmarks names the suite from the caller's folder."""
    suite = tiny_suite(tmp_path / "suite", ONE_CASE)
    caller = tmp_path if relative_suite else tmp_path / "caller"
    caller.mkdir(exist_ok=True)
    monkeypatch.chdir(caller)
    given = "suite/benchmarks" if relative_suite else str(suite)
    assert bench.main(["--benchmarks", given, "--out", "results", "--no-plots"]) == 0
    assert (caller / "results" / "table.md").is_file() and not (suite.parent / "results").exists()


def test_table_shows_device_time_and_back_to_back_beside_call_time_when_measured():
    timed = dict(median_ms=0.05, rate="", pct=3.0, peak=1.0, device_ms=0.01, device_pct=15.0, back_to_back_ms=0.02)
    untimed = dict(median_ms=0.07, rate="", pct=None, peak=None, device_ms=None, device_pct=None)
    table = bench.markdown_table({"case": {"fastguide": timed, "eager": untimed}}, "a GPU")
    assert "| device time | back to back |" in table.splitlines()[2]
    assert "| 0.010 ms (15.0%) | 0.020 ms |" in table
    assert "device time" not in bench.markdown_table({"case": {"eager": untimed}}, "a CPU")


def test_ratio_is_taken_against_the_rows_users_can_choose():
    def row(ms):
        return dict(median_ms=ms, rate="", pct=None, peak=None)

    # a forced kernel path (the pointer attention kernel) faster than the default: no base
    cases = {"case": {"fastguide": row(2.0), "fastguide-pointer": row(1.0), "sdpa-flash": row(1.5)}}
    table = bench.markdown_table(cases, "a GPU")
    assert "| sdpa-flash | 1.500 ms |  |  |  | 0.75× |" in table
    assert "| fastguide-pointer | 1.000 ms |  |  |  | 0.50× |" in table
    # among the selectable rows, the fastest (a backend, or graphs)
    cases = {"case": {"fastguide-triton": row(3.0), "fastguide-cuda": row(2.0), "eager": row(4.0)}}
    assert "| eager | 4.000 ms |  |  |  | 2.00× |" in bench.markdown_table(cases, "a GPU")


def test_gpu_call_time_starts_each_call_with_the_device_idle(monkeypatch):
    # Each call is timed from a start event recorded after a sync (its L2 flush done), so
    # its host work is in the time: triton's do_bench records the start right behind the
    # flush, and up to the flush's ~60-85 µs of host work went unseen. The median is kept.
    from benchmarks import timing

    log: list[str] = []
    clock = iter(range(1000))

    class Event:  # a CUDA event on a fake clock: each record a tick
        def __init__(self, enable_timing: bool):
            self.tick = None

        def record(self):
            self.tick = next(clock)
            log.append("record")

        def elapsed_time(self, end: "Event") -> float:  # ms
            return float(end.tick - self.tick)

    monkeypatch.setattr(timing, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(timing, "L2_FLUSH_BYTES", 64)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    calls = iter([0, 0, 0, *([0] * 4), 5, 5, 5, 5, 5, 5])  # ticks fn takes, per call

    def fn():
        log.append("fn")
        for _ in range(next(calls)):
            next(clock)

    seconds = timing._cuda_call_seconds(fn, budget=0.01)  # 10 calls of 1 ms after the 3 warm-up ones
    assert log[:6] == ["sync", "record", "fn", "record", "sync", "sync"]
    assert log.count("fn") == 13 and log.count("sync") == 26
    assert seconds == pytest.approx(6e-3)  # the median of 4 calls of 1 tick and 6 of 6


@pytest.mark.gpu
def test_a_backward_whose_forward_ran_for_capture_has_a_device_time():
    # Autograd runs each backward op on its forward's stream: a forward on the default stream
    # put the backward benchmarks' kernels outside device_seconds' capture (no device time).
    from benchmarks import timing

    x = torch.randn(64, 1152, device="cuda", requires_grad=True)
    with torch.enable_grad(), timing.forward_for_capture():
        y = torch.nn.functional.layer_norm(x, (1152,))
    dy = torch.randn_like(y)
    seconds = timing.device_seconds(lambda: torch.autograd.grad(y, x, dy, retain_graph=True))
    assert seconds is not None and seconds > 0


def test_recorder_times_cases_as_the_sampler_calls_them_under_no_grad():
    from benchmarks.conftest import Recorder

    class FakeBenchmark:  # pytest-benchmark's fixture: calls fn, keeps extra_info and stats
        def __init__(self):
            self.extra_info: dict = {}
            self.stats = None  # as with --benchmark-disable

        def __call__(self, fn):
            fn()

    seen = []
    grad_input = torch.ones(3, requires_grad=True)

    def case():
        seen.append(torch.is_grad_enabled())
        return grad_input * 2

    Recorder(FakeBenchmark(), copy_bandwidth=1e9, matmul_rate=1e9)(case, bytes_moved=12)
    assert seen and not any(seen)
    seen.clear()
    Recorder(FakeBenchmark(), copy_bandwidth=1e9, matmul_rate=1e9)(case, grad=True)  # a backward's case
    assert seen and all(seen)
    # On the CPU, the table's median is pytest-benchmark's over its rounds, not a few calls.
    measured = FakeBenchmark()
    measured.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=0.004))
    Recorder(measured, copy_bandwidth=1e9, matmul_rate=1e9)(case, bytes_moved=12)
    assert measured.extra_info["median_ms"] == pytest.approx(4.0)
    assert measured.extra_info["GB/s"] == pytest.approx(12 / 0.004 / 1e9)


def test_a_case_that_fails_while_measured_has_no_row_in_the_table():
    # pytest-benchmark keeps the record of its rounds when the case fails after them (out of
    # memory in the device-time replay, say): the table showed those rounds as its time
    from benchmarks.conftest import Recorder

    class FailsAfterItsRounds:
        def __init__(self):
            self.extra_info: dict = {}

        def __call__(self, fn):
            fn()

        @property
        def stats(self):
            raise torch.OutOfMemoryError("CUDA out of memory")

    failing = FailsAfterItsRounds()
    with pytest.raises(torch.OutOfMemoryError):
        Recorder(failing, copy_bandwidth=1e9, matmul_rate=1e9)(lambda: torch.ones(3), bytes_moved=12)
    assert failing.extra_info["incomplete"]
    record = {"name": "test_case[impl-fastguide]", "params": {"impl": "fastguide"}, "stats": {"median": 1e-5}}
    data = {"benchmarks": [{**record, "extra_info": failing.extra_info}]}
    assert bench.group_results(data) == {}
    data = {"benchmarks": [{**record, "extra_info": {"median_ms": 0.01}}]}  # (a completed one)
    assert list(bench.group_results(data)) == ["test_case"]


def test_attention_autotunes_over_every_config_unless_told_otherwise(monkeypatch, tmp_path):
    # Benchmarks run under pytest: importing pytest must not narrow the tuning (it did).
    from fastguide.kernels import attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(attention.AUTOTUNE_SETTING, raising=False)
    assert "pytest" in sys.modules
    assert len(attention._configs()) > 1 and len(attention._configs(for_backward=True)) > 1
    monkeypatch.setenv(attention.AUTOTUNE_SETTING, "off")
    assert len(attention._configs()) == 1
    # ... and the benchmark runner keeps the tests' setting out of the suite's environment.
    captured = {}
    monkeypatch.setattr(
        bench.subprocess,
        "run",
        lambda command, **kwargs: captured.update(kwargs) or subprocess.CompletedProcess(command, 5),
    )
    with pytest.raises(RuntimeError, match="no benchmark ran"):
        bench.run_suite(bench.find_benchmarks(), tmp_path, None)
    assert attention.AUTOTUNE_SETTING not in captured["env"]


@pytest.mark.parametrize(
    "name, peer",
    [
        ("DiT-XL/2-256", "official"),
        ("DiT-XL/2-256", "diffusers"),
        ("ADM-256", "official"),
        ("SD-1.5-UNet", "diffusers"),
    ],
)
def test_end_to_end_rows_do_the_same_work(name, peer):
    # The benchmark's rows sample the same thing: fastguide's loop and the written-out peer
    # loop agree on the same weights and noise (its CPU set: tiny models, 3 steps).
    from benchmarks.sampling import bench_end_to_end as e2e

    setup = e2e.SETUPS[name]
    rows = e2e.ROWS[setup.family](setup.cpu, 2)
    torch.testing.assert_close(rows["fastguide"](), rows[peer](), atol=2e-4, rtol=2e-4)


def test_sampling_loops_do_the_same_work():
    # bench_sample's end-to-end rows (compact UNet, its zero-initialised output convs drawn
    # at random so the model outputs more than zero) sample the same thing.
    from benchmarks.conftest import seeded_weights
    from benchmarks.sampling.bench_sample import end_to_end_loops
    from fastguide.models.configs import create_model, unet_config

    loops = end_to_end_loops(torch.device("cpu"), pairs=2, steps=3)
    torch.testing.assert_close(loops["fastguide"](), loops["diffusers"](), atol=2e-4, rtol=2e-4)
    fresh = create_model(**unet_config("compact")).eval()
    x, t, y = torch.randn(1, 1, 16, 16), torch.tensor([500]), torch.tensor([0])
    with torch.no_grad():
        assert not fresh(x, t, y).any() and seeded_weights(fresh)(x, t, y).abs().mean() > 1e-3


def test_end_to_end_attention_flops_are_sdpas():
    # fastguide's attention op, which the floor's counter sees whole, counts as torch
    # counts SDPA (forward: two batched matrix products), cross-attention included.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils import flop_counter
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.sampling import bench_end_to_end as e2e

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert e2e.attention_flops(q, k, v) == counter.get_total_flops() == 2 * 6 * 5 * 11 * 16
    # the backward as torch counts its fused kernels' (five products, 2.5× the forward here)
    shapes = [tuple(t.shape) for t in (q, q, k, v)]
    assert e2e.attention_flops(q, k, v, backward=True) == flop_counter.sdpa_backward_flop_count(*shapes) == 26400


def test_end_to_end_flop_floor_is_the_loops_forwards():
    # The floor is the model work of the whole loop: STEPS forwards of the 2B batch [z; z]
    # (CFG), its linear layers and patch embedding (torch's count) and, in closed form, each
    # block's attention over the tokens; a step's own arithmetic adds nothing.
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.sampling import bench_end_to_end as e2e

    pytest.importorskip("diffusers")
    setup = e2e.SETUPS["DiT-XL/2-256"].cpu
    batch = 2
    config = fastguide.dit_config(setup["preset"]) | {"input_size": setup["input_size"]}
    model = fastguide.DiT(**config).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), fastguide.backend("torch"):
        model(torch.randn(2 * batch, 4, 16, 16), torch.full((2 * batch,), 500), torch.arange(2 * batch))
    layers = counter.get_total_flops()
    assert layers > 0 and "fastguide" not in str(counter.get_flop_counts())  # its attention unseen
    tokens = (setup["input_size"] // model.patch_size) ** 2
    attention = len(model.blocks) * 4 * (2 * batch) * tokens**2 * config["hidden_size"]
    assert e2e.loop_flops(e2e.ROWS["dit"](setup, batch), "dit")[0] == e2e.STEPS * (layers + attention)


def test_a_compiled_case_that_would_compile_again_while_timed_fails():
    # Timed eager code, or a compile, under the torch.compile label is what this prevents.
    from benchmarks.conftest import Recorder, compiled

    class CallingBenchmark:
        extra_info: dict = {}

        def __call__(self, fn):
            fn()

    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch < 2.6 has no fail_on_recompile stance")
    sizes = iter([3, 4])  # the warm-up's shape, then another
    double = compiled(lambda x: x * 2, backend="eager")
    try:
        with pytest.raises(RuntimeError, match="recompile"):
            Recorder(CallingBenchmark(), copy_bandwidth=1e9, matmul_rate=1e9)(lambda: double(torch.ones(next(sizes))))
    finally:
        torch._dynamo.reset()


def test_bench_says_when_it_replaces_an_earlier_runs_results(tmp_path, capsys):
    suite = tiny_suite(tmp_path, ONE_CASE)
    argv = ["--benchmarks", str(suite), "--out", str(tmp_path / "out"), "--no-plots"]
    assert bench.main(argv) == 0
    assert "replacing" not in capsys.readouterr().err
    assert bench.main(argv) == 0
    assert "replacing the results of an earlier run" in capsys.readouterr().err


def test_a_run_where_nothing_ran_keeps_an_earlier_runs_results(tmp_path, capsys):
    # -k with no match deleted the earlier results.json before finding that nothing ran.
    suite = tiny_suite(tmp_path, ONE_CASE)
    argv = ["--benchmarks", str(suite), "--out", str(tmp_path / "out"), "--no-plots"]
    assert bench.main(argv) == 0
    earlier = (tmp_path / "out" / "results.json").read_text()
    capsys.readouterr()
    assert bench.main([*argv, "-k", "no_such_case"]) == 1
    err = capsys.readouterr().err
    assert "no benchmark ran" in err and "the earlier results in" in err and "are kept" in err
    assert (tmp_path / "out" / "results.json").read_text() == earlier
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["results.json", "table.md"]
