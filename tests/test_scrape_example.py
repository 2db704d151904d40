"""The README's demo: the scraping example crawls its local site on the embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def _demo(hub: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.scrape",
            "--pages",
            "60",
            "--hub",
            hub,
            "--data-dir",
            str(tmp_path),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(150)
def test_demo_with_a_worker_subprocess(hub: str, tmp_path: Path) -> None:
    done = _demo(hub, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "summary: 60 pages, 6 not found (expected: the site has 6 broken links on purpose), "
        "0 errors, 66 tasks" in done.stdout
    )
    assert "worker exited with status 0" in done.stdout


@pytest.mark.timeout(150)
def test_demo_with_the_worker_embedded(hub: str, tmp_path: Path) -> None:
    done = _demo(hub, tmp_path, "--embedded")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "summary: 60 pages, 6 not found (expected: the site has 6 broken links on purpose), "
        "0 errors, 66 tasks" in done.stdout
    )
