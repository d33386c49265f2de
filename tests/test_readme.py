"""README's two commands: they work on a fresh Debian/Ubuntu machine as written, and CI runs the second."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = "python3 -m venv .venv && . .venv/bin/activate && "


def _blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"^```\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)]


def test_the_two_commands_install_into_a_virtual_environment():
    """A system Python that refuses pip installs (PEP 668) is never asked to install anything."""
    demo, tests = _blocks()[:2]
    for cmd in (demo, tests):
        assert cmd.startswith(VENV) and "\n" not in cmd and "sudo" not in cmd and "--break-system-packages" not in cmd
        assert cmd.index(". .venv/bin/activate") < cmd.index("pip install")
    assert demo.endswith("wsi-haloae demo") and tests.endswith("python -m pytest -q")
    assert 'pip install -e ".[test]"' in tests


def test_ci_runs_the_second_command_word_for_word():
    script = (REPO / ".ci" / "run").read_text()
    extract = re.search(r'test_command="\$\((awk .*)\)"', script).group(1)
    got = subprocess.run(["bash", "-c", extract], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert got == _blocks()[1]
    assert 'bash -euo pipefail -c "$test_command"' in script
