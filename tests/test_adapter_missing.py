"""The best adapter is never lost silently (issue 17): a trial whose checkpoint the driver cannot
read at its end is recorded as failed, naming the path and the fix."""

from __future__ import annotations

import shutil

from ray import tune

from orchestrator.callbacks import _readable


def test_a_checkpoint_the_driver_cannot_read_is_not_readable(tmp_path):
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    checkpoint = tune.Checkpoint.from_directory(str(folder))
    assert _readable(checkpoint)
    shutil.rmtree(folder)  # written on another node's disk, as the driver sees it
    assert not _readable(checkpoint)
