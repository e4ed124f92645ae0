"""README's commands stay true: the main job runs, and CI runs the README's test command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    runner = test_command.split("&&")[-1].strip()
    assert runner in (ROOT / ".ci" / "run").read_text()


def test_main_job_runs_and_reports_agreement():
    main_command = next(c for c in readme_commands() if "python -m fastguide" in c)
    module = main_command.split("python -m")[-1].split()[0]
    result = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, check=True)
    for op in ("attention", "group_norm", "guided_step"):
        assert re.search(rf"{op}\s.*\sok$", result.stdout, flags=re.M), result.stdout
