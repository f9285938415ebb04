"""The start-up timeline that bench.startup reads: silent by default, one JSON line per mark when asked."""

from __future__ import annotations

import json
import time

from torchferry.distributed import timeline


def test_mark_writes_nothing_unless_the_environment_names_a_file(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(timeline.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    timeline.mark("driver_main")
    assert list(tmp_path.iterdir()) == []


def test_marks_append_one_line_each_with_time_and_process(tmp_path, monkeypatch) -> None:
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(timeline.ENV, str(path))
    before = time.time()
    timeline.mark("driver_main")
    timeline.mark("worker_entry", rank=1, process_started=timeline.process_started())
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["driver_main", "worker_entry"]
    assert before <= lines[0]["t"] <= lines[1]["t"] <= time.time() and lines[1]["rank"] == 1
    assert lines[1]["process_started"] is None or lines[1]["process_started"] <= before
