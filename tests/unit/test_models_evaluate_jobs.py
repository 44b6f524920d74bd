"""``python -m models.evaluate --jobs``: phantoms evaluated in worker processes give the rows of
the evaluation in one process, in seed order (about 40 s: four phantom detections)."""

from __future__ import annotations

from typing import Any

import pytest

from models.evaluate import TEST_OFFSET, _phantom_rows, evaluation_detector


def _without_timings(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "timings"}


@pytest.mark.slow
def test_rows_from_worker_processes_equal_the_rows_of_one_process() -> None:
    det = evaluation_detector(threads=1)
    seeds = [TEST_OFFSET + 8, TEST_OFFSET + 4]  # 1 and 2 nodules
    alone = [_without_timings(r) for r in _phantom_rows(det, seeds, False, jobs=1)]
    pooled = [_without_timings(r) for r in _phantom_rows(det, seeds, False, jobs=2)]
    assert [len(r["case"].references) for r in alone] == [1, 2]
    assert pooled == alone
