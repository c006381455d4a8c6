"""The driver's MLflow outbox (orchestrator/outbox.py): writes land in order, once, across an
outage; a write MLflow refuses for good is named and skipped, not retried ahead of the rest."""

from __future__ import annotations

import time

from mlflow.exceptions import MlflowException

from orchestrator import outbox as outbox_mod
from orchestrator.outbox import Outbox


def test_writes_land_in_order_across_an_outage(monkeypatch):
    monkeypatch.setattr(outbox_mod, "RETRY_FIRST_S", 0.01)
    down_until = time.monotonic() + 0.5
    landed: list[int] = []

    def write(i: int) -> None:
        if time.monotonic() < down_until:
            raise ConnectionError("connection refused")  # the server is down
        landed.append(i)

    box = Outbox()
    for i in range(5):
        box.put(write, i)
    assert not box.flush(0.1) and box.pending == 5 and "connection refused" in box.failing
    assert box.flush(10) and landed == [0, 1, 2, 3, 4] and box.failing is None
    box.close()


def test_a_refused_write_is_named_and_the_rest_go_on():
    landed: list[str] = []

    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    def refused() -> None:  # as MLflow answers for a run deleted in the UI meanwhile
        raise MlflowException("Run 'abc' not found", error_code=RESOURCE_DOES_NOT_EXIST)

    box = Outbox()
    box.put(refused)
    box.put(landed.append, "next")
    assert box.flush(5) and landed == ["next"]
    assert len(box.errors) == 1 and "not found" in box.errors[0]
    box.close()


def test_flush_stops_waiting_when_asked():
    box = Outbox()
    box.put(time.sleep, 2)
    t0 = time.monotonic()
    assert not box.flush(60, stop=lambda: time.monotonic() - t0 > 0.2)
    assert time.monotonic() - t0 < 1.5
    box.close()
