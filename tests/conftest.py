"""Shared fixtures: a tiny random-init Llama with a tokenizer trained in code, small data files.

The tiny model stands in for a real base model in CI (no GPU, no model hub); everything else in
the integration tests is real: local Ray, sqlite MLflow, sqlite Optuna.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers import demo_task


def _texts():
    for split in ("train", "validation"):
        for row in demo_task.make_split(split):
            for m in row["messages"]:
                yield m["content"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a byte-level BPE tokenizer, saved like any HF folder."""
    from workers.synthetic import build_random_llama, build_tokenizer

    return build_random_llama(tmp_path_factory.mktemp("tiny-llama"), build_tokenizer(_texts()))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """Small train/validation/test JSONL files cut from the demo task."""
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_rows(d / "train.jsonl", demo_task.make_split("train")[:48]),
        "validation": write_rows(d / "validation.jsonl", demo_task.make_split("validation")[:4]),
        "test": write_rows(d / "test.jsonl", demo_task.make_split("test")[:4]),
    }


@pytest.fixture(scope="session")
def trial_config(tiny_model, small_data):
    """``trial_config(**overrides)``: a short LoRA trial of the tiny model on the small data,
    for the worker's own loop (no Ray)."""
    from workers.train import TrialConfig

    base = dict(
        model=str(tiny_model),
        train_path=str(small_data["train"]),
        validation_path=str(small_data["validation"]),
        rank=4,
        alpha=8,
        target_modules="all_linear",
        learning_rate=5e-3,
        max_steps=6,
        eval_every=2,
        batch_size=4,
        max_seq_len=160,
        eval_examples=4,
        max_new_tokens=8,
        prior_step_s=0.05,
        prior_closing_s=0.5,
    )
    return lambda **kw: TrialConfig(**{**base, **kw})


def _start_local_ray() -> None:
    import ray

    ray.init(
        address="local",  # its own, whatever `ray start` cluster this machine has (or had)
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        # as lorasweep's own local clusters: no idle pool (the outside clock counts a worker
        # from its start, tests/outside_clock.py)
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
    )


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():  # a module's own Ray (``ray_module``) may be up
        _start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_module():
    """A local Ray for one module, shut down after it, for modules that run before the tests
    checking that bad input starts no cluster (tests/test_bad_input.py); the session's if it
    is already up."""
    import ray

    if ray.is_initialized():
        yield
        return
    _start_local_ray()
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def own_greedy_cases():
    """``cases(model, tokenizer, examples, tokens)``: each example with, as its reference, the
    model's own greedy output (``tokens`` long) with one token changed a third of the way in, so
    decoding starts there and the reference's rest is the right guess for what follows."""
    import dataclasses

    from workers import evaluate
    from workers.data import encode_prompt

    def cases(model, tokenizer, examples, tokens: int) -> list:
        prompts = [encode_prompt(tokenizer, ex) for ex in examples]
        generated = evaluate.generate_ids(model, tokenizer, prompts, [tokens] * len(prompts))
        out = []
        for ex, ids in zip(examples, generated, strict=True):
            h = len(ids) // 3
            changed = ids[:h] + [(ids[h] + 7) % 50] + ids[h + 1 :]
            answer = tokenizer.decode(changed, skip_special_tokens=True)
            out.append(dataclasses.replace(ex, answer=answer))
        return out

    return cases
