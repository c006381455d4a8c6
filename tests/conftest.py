"""Shared fixtures: a tiny random-init Llama with a tokenizer trained in code, small data files.

The tiny model stands in for a real base model in CI (no GPU, no model hub); everything else in
the integration tests is real: local Ray, sqlite MLflow, sqlite Optuna.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers import demo_task

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _texts():
    for split in ("train", "validation"):
        for row in demo_task.make_split(split):
            for m in row["messages"]:
                yield m["content"]


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama (hidden 64) and a byte-level BPE tokenizer, saved like any HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


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
def ray_local():
    """One local Ray for the whole session (2 CPUs, like CI)."""
    import ray

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
