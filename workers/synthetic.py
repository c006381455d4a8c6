"""Random-init Llama models and a small tokenizer built in code, for tests and benchmarks.

Memory and speed depend on the shape, not on the weights, so random init measures them faithfully
without a model hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Llama-shape presets (bf16 weights: 0.5B ~ 0.9 GiB, 1.5B ~ 2.8 GiB)
SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "llama-0.5b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
    "llama-1.5b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``texts``, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_random_llama(
    out: Path,
    tokenizer,
    shape: str = "tiny",
    vocab_size: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> Path:
    """Save a random-init Llama of a preset ``shape`` with ``tokenizer`` as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=4096,
        tie_word_embeddings=shape == "tiny",
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **SHAPES[shape],
    )
    with torch.device("meta"):
        LlamaForCausalLM(config)  # fail fast on a bad shape before allocating
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_demo_inputs(work: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny random-init Llama (its tokenizer trained on the demo task's text) and small
    train/validation/test JSONL files cut from the demo task, under ``work``: a sweep's inputs
    with no model hub (the fault benchmark's and the cluster smoke's)."""
    import json

    from workers import demo_task

    def texts():
        for split in ("train", "validation"):
            for row in demo_task.make_split(split):
                for m in row["messages"]:
                    yield m["content"]

    model_dir = Path(work) / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    model = build_random_llama(model_dir, build_tokenizer(texts()))
    data = {}
    for split, n in (("train", 48), ("validation", 4), ("test", 4)):
        path = Path(work) / f"{split}.jsonl"
        rows = demo_task.make_split(split)[:n]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data[split] = path
    return Path(model), data
