"""README.md's first commands: the test command is what CI runs, and both install the same way."""

from __future__ import annotations

import re

from test.paths import REPO_ROOT

INSTALL = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt"
           " && .venv/bin/pip install --no-deps -e .")


def _readme_commands() -> list[str]:
    """The command line of each bash block before the first section heading (the fresh-machine ones)."""
    intro = (REPO_ROOT / "README.md").read_text().split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", intro, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_test_command_is_the_line_ci_runs() -> None:
    # README: "exactly what CI runs, via .ci/run".
    demo, tests = _readme_commands()
    assert demo == f"{INSTALL} && .venv/bin/pi0-policy demo"
    assert tests == f"{INSTALL} && .venv/bin/python -m pytest test -q"
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines
