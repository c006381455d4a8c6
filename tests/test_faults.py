"""The fault hook's parser and its sweep-wide counts (``workers/faults.py``); fast, no Ray."""

from __future__ import annotations

import math
import multiprocessing

import pytest

from workers import faults
from workers.faults import Fault


def test_plain_forms_hit_every_time():
    assert faults.parse("hang@3, nan@5") == [Fault("hang", 3), Fault("nan", 5)]
    assert faults.parse(None) == [] and faults.parse("") == []
    for _ in range(3):
        assert math.isnan(faults.loss("nan@2", 2, 1.0))
    assert faults.loss("nan@2", 3, 1.0) == 1.0
    assert faults.loss(None, 2, 1.0) == 1.0


def test_counted_form_parses(tmp_path):
    assert faults.parse(f"nan@3x1|{tmp_path},hang@5x2|{tmp_path}") == [
        Fault("nan", 3, 1, str(tmp_path)),
        Fault("hang", 5, 2, str(tmp_path)),
    ]


@pytest.mark.parametrize(
    "bad", ["nan", "nan@", "nan@x", "boom@3", "nan@3x1", "nan@3|/tmp/x", "nan@3x0|/tmp/x"]
)
def test_malformed_faults_are_refused(bad):
    with pytest.raises(ValueError, match="fault"):
        faults.parse(bad)


def test_counted_fault_fires_at_most_n_times(tmp_path):
    spec = f"nan@3x2|{tmp_path / 'count'}"
    hits = [math.isnan(faults.loss(spec, 3, 1.0)) for _ in range(5)]
    assert hits == [True, True, False, False, False]
    assert not math.isnan(faults.loss(spec, 4, 1.0))  # another step never claims a token
    assert sorted(p.name for p in (tmp_path / "count").iterdir()) == ["nan@3.0", "nan@3.1"]


def _fires(spec: str) -> bool:
    return math.isnan(faults.loss(spec, 3, 1.0))


def test_the_count_is_shared_across_processes(tmp_path):
    spec = f"nan@3x1|{tmp_path}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        hits = pool.map(_fires, [spec] * 8)
    assert sum(hits) == 1


def test_counted_hang_sleeps_once(tmp_path, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    spec = f"hang@2x1|{tmp_path}"
    for _ in range(3):
        faults.before_step(spec, 2)
    assert slept == [faults.HANG_S]
