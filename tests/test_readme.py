"""README's commands stay true: the main job runs, and CI runs the README's test command."""

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    *installs, runner = (part.strip() for part in test_command.split("&&"))
    assert runner in ci
    for install in installs:  # CI installs every package the README's command does
        command = install.strip("{ }").split("||")[0]  # (an optional one: `{ pip install ... || echo ...; }`)
        packages = [word for word in command.split("install", 1)[1].split() if not word.startswith("-")]
        assert packages and all(package in ci for package in packages), install


def test_main_job_runs_as_written(tmp_path):
    # The README's first command after installing: run the same CLI in this environment.
    main_command = readme_commands()[0]
    cli_args = main_command.split("&&")[-1].split()
    assert cli_args[0] == "fastguide"
    result = subprocess.run(
        [sys.executable, "-m", "fastguide", *cli_args[1:], "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "digits.png").is_file()


def test_selfcheck_reports_agreement():
    result = subprocess.run(
        [sys.executable, "-m", "fastguide", "selfcheck"], capture_output=True, text=True, check=True
    )
    for op in ("attention", "group_norm", "layer_norm", "guided_step"):
        assert re.search(rf"{op}\s.*\sok$", result.stdout, flags=re.M), result.stdout


def test_selfcheck_reports_an_op_that_raises_and_checks_the_others(monkeypatch, capsys):
    # An op that raised (an extension that does not load, say) ended the command in a
    # traceback, with the other ops unchecked and the backends' summary unprinted
    from fastguide.apps import selfcheck

    def broken(device, generator):
        raise RuntimeError("the cuda backend's extension fastguide._C does not load: bad ELF\nmore")

    monkeypatch.setitem(selfcheck.CHECKS, "group_norm", broken)
    assert selfcheck.run(torch.device("cpu")) == 1
    out = capsys.readouterr().out
    assert "group_norm   FAIL: RuntimeError: the cuda backend's extension fastguide._C does not load: bad ELF\n" in out
    for op in ("attention", "layer_norm", "guided_step"):
        assert re.search(rf"{op}\s.*\sok$", out, flags=re.M), out
    assert "backends here:" in out
