"""A wrong setting stops every entry point with one line naming the variable, and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailplatform.testing import ROOT, env_with

ENTRY_POINTS = {
    "manage.py": [sys.executable, "manage.py", "check"],
    "celery": [sys.executable, "-m", "celery", "-A", "mailplatform", "worker", "-Q", "maintenance"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "mailplatform.asgi:application", "--port", "0"],
}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_it_stops_on_a_bad_setting_with_one_line(entry_point: str) -> None:
    result = subprocess.run(
        ENTRY_POINTS[entry_point],
        cwd=ROOT,
        env=env_with(DEBUG="maybe"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip()
    assert output == "configuration error: DEBUG: expected a boolean (true/false/1/0), got 'maybe'", output
    assert result.returncode == 2
