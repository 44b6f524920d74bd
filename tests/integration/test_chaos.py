"""The short fuzz run (``make chaos`` runs 10,000 of each): malformed PDUs and mutated datasets
leave no thread dead, no request unanswered, no stray file, no memory behind.

It runs in a process of its own, as ``make chaos`` does: its RSS is the node's, not pytest's
(whose log capture keeps every record the node writes).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_malformed_pdus_and_mutated_datasets_are_all_answered_and_break_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--pdus", "300", "--datasets", "300", "--seed", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    figures = [line for line in done.stdout.splitlines() if line]
    print("\n" + "\n".join(figures))
    assert done.returncode == 0, (figures, done.stderr[-3000:])
    assert figures[0].startswith("malformed PDUs: 300 ")
    assert figures[2].startswith("mutated datasets: 300 ")
    assert "0xA900" in figures[3] and "0xC210" in figures[3]
    assert figures[4] == "thread crashes: 0"
