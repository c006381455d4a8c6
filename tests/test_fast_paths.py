"""Padding-free packing and the shortcut evaluation give what the plain paths give (CPU, no Ray).

The tiny random model stands in for a real one; on CUDA the packed attention runs torch's varlen
flash kernel instead of the per-row SDPA calls checked here (the H100 benchmark exercises it).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers import evaluate, fast, packing, static_decode
from workers.data import encode_for_training, encode_prompt, pad_batch, read_examples
from workers.lora import attach_lora
from workers.model import load_tokenizer


def _lora_model(tiny_model, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    torch.manual_seed(1)
    return attach_lora(model, rank=4, alpha=8, target_modules="all_linear", dropout=0.0)


def _rows(vocab: int) -> list[tuple[list[int], list[int]]]:
    torch.manual_seed(0)
    rows = []
    for length, prompt in [(20, 6), (9, 3), (33, 10), (1, 0)]:
        ids = torch.randint(0, vocab, (length,)).tolist()
        rows.append((ids, [-100] * prompt + ids[prompt:]))
    return rows


def test_pack_lays_rows_end_to_end():
    batch = packing.pack([([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # no row predicts the next row
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["max_length_q"] == 3


def test_packed_step_equals_padded_step(tiny_model):
    padded, packed = _lora_model(tiny_model), _lora_model(tiny_model)
    assert packing.enable(fast.causal_lm(packed))
    rows = _rows(padded.config.vocab_size)
    expected = fast.loss(padded, pad_batch(rows, 0))
    got = fast.loss(packed, packing.pack(rows))
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    expected.backward()
    got.backward()
    grads = {n: p.grad for n, p in padded.named_parameters() if p.grad is not None}
    assert grads
    for n, p in packed.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    # padded input (evaluation) still takes the SDPA path, with its mask
    batch = pad_batch(rows, 0)
    assert float(packed(**batch).loss) == pytest.approx(float(padded(**batch).loss), rel=1e-5)


def test_evaluate_generates_what_greedy_decoding_generates(tiny_model, small_data):
    """Three cases in one batch: a reference the model reproduces (no decoding needed), one it
    leaves halfway (decoded from there), and the demo's own references (decoded from the start)."""
    model = _lora_model(tiny_model).eval()
    tokenizer = load_tokenizer(str(tiny_model))
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:3]
    own = evaluate.generate(model, tokenizer, examples, 12)
    halfway = own[1][: len(own[1]) // 2] + " changed"
    cases = [
        dataclasses.replace(examples[0], answer=own[0]),
        dataclasses.replace(examples[1], answer=halfway),
        examples[2],
    ]
    expected = evaluate.generate(model, tokenizer, cases, 12)
    got = evaluate.evaluate(model, tokenizer, cases, 256, 12, batch_size=2)
    assert got["generations"] == expected
    assert got["tokens_generated"] < 12 * len(cases)  # the reproduced prefixes were not decoded
    assert got["rows_generated"] in (2, 3)  # 3 only if own[0] re-tokenises differently


_CUDA = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("device", "static"),
    [
        ("cpu", False),
        ("cpu", True),
        pytest.param("cuda", True, marks=_CUDA),
        pytest.param("cuda", False, marks=_CUDA),
    ],
)
def test_decoding_with_guesses_keeps_greedy_tokens(
    tiny_model, small_data, own_greedy_cases, device, static, monkeypatch
):
    """References that the model leaves a third of the way in and then follows again: several
    guessed tokens are kept per step, and the generations are still exactly greedy's. Both
    decoding routes: transformers' own cache (steps as wide as their guesses, finished rows
    dropped) and the static cache (fixed-shape steps; on CUDA replayed as a graph). On CUDA in
    float32 too, so that the comparison is of the method, not of bf16 rounding on a random
    model's near-ties (``pytest -m gpu``)."""
    monkeypatch.setattr(evaluate, "STATIC_DEVICES", {device} if static else set())
    steps = []
    real = static_decode.Steps.__call__
    monkeypatch.setattr(
        static_decode.Steps,
        "__call__",
        lambda self, ids, pos: steps.append(self.graph is not None) or real(self, ids, pos),
    )
    model = _lora_model(tiny_model).to(device).eval()
    tokenizer = load_tokenizer(str(tiny_model))
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:4]
    cases = own_greedy_cases(model, tokenizer, examples, 24)
    expected = evaluate.generate(model, tokenizer, cases, 24)
    passes = []
    forced = evaluate._teacher_forced
    monkeypatch.setattr(
        evaluate,
        "_teacher_forced",
        lambda m, t, rows, *a: passes.append(rows) or forced(m, t, rows, *a),
    )
    got = evaluate.evaluate(model, tokenizer, cases, 256, 24, batch_size=3, chunk_tokens=10**6)
    assert got["generations"] == expected
    assert got["rows_generated"] == 4
    assert got["decode_steps"] < got["tokens_generated"] / 2  # guesses were kept
    assert len(steps) == (got["decode_steps"] if static else 0)
    if static and device == "cuda":
        assert any(steps)  # later steps replayed the graph the first one captured
    assert [len(rows) for rows in passes] == [4]  # all at once: the token allowance lets them
    passes.clear()
    small = evaluate.evaluate(model, tokenizer, cases, 256, 24, batch_size=3, chunk_tokens=1)
    assert small["generations"] == expected
    assert [len(rows) for rows in passes] == [2, 2]  # the caller's batch of 3, spread evenly
    if static and device == "cuda":
        assert steps.count(True) > 0  # steps replayed on a CUDA graph


def test_a_sliding_window_model_decodes_without_the_kept_cache(
    tiny_model, small_data, own_greedy_cases
):
    """A sliding-window cache drops old positions, so such models decode onwards with plain
    greedy decoding (prompt and reproduced prefix prefilled again): the same generations."""
    model = _lora_model(tiny_model).eval()
    tokenizer = load_tokenizer(str(tiny_model))
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:3]
    cases = own_greedy_cases(model, tokenizer, examples, 16)
    expected = evaluate.generate(model, tokenizer, cases, 16)
    fast.causal_lm(model).config.sliding_window = 4096
    assert not evaluate._cache_reusable(model)
    got = evaluate.evaluate(model, tokenizer, cases, 256, 16, batch_size=2)
    assert got["generations"] == expected
    assert got["rows_generated"] == 3


def test_draft_follows_the_longest_suffix_nearest_where_the_generation_stands():
    reference, prompt = [1, 2, 3, 4, 5, 2, 3, 9], [7, 8, 3, 6]
    sources = [(reference, 2), (prompt, len(prompt))]
    assert evaluate._draft([0, 2, 3], sources, 2) == [4, 5]  # "2 3" ends at 3 and at 7: 3 is nearer
    assert evaluate._draft([0, 2, 3], [(reference, 7), (prompt, 4)], 2) == [9]
    assert evaluate._draft([0, 1, 2], sources, 2) == [3, 4]
    assert evaluate._draft([0, 8, 3], sources, 2) == [6]  # only the prompt holds "8 3"
    assert evaluate._draft([0, 0, 6], sources, 2) == []  # nothing follows a 6
    assert evaluate._draft([0, 0, 2], sources, 2) == []  # a 1-token match is no evidence
    assert evaluate._draft([0, 0, 2], sources, 2, shortest=1) == [3, 4]
    assert evaluate._draft([0, 1, 2], sources, 1, shortest=3) == []


def test_evaluate_loss_is_the_answer_cross_entropy(tiny_model, small_data):
    model = _lora_model(tiny_model).eval()
    tokenizer = load_tokenizer(str(tiny_model))
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:3]
    longest_prompt = max(len(encode_prompt(tokenizer, ex)) for ex in examples)
    max_seq_len = longest_prompt + 6  # some answers cut short, as training cuts them
    rows = [encode_for_training(tokenizer, ex, max_seq_len) for ex in examples]
    with torch.no_grad():
        expected = float(model(**pad_batch(rows, tokenizer.pad_token_id)).loss)
    got = evaluate.evaluate(model, tokenizer, examples, max_seq_len, 4, batch_size=3)["eval_loss"]
    assert got == pytest.approx(expected, rel=1e-4)


def test_a_decoding_penalty_takes_the_plain_path(tiny_model, small_data):
    model = _lora_model(tiny_model).eval()
    assert evaluate._plain_greedy(model)
    model.generation_config.repetition_penalty = 1.3
    assert not evaluate._plain_greedy(model)
    tokenizer = load_tokenizer(str(tiny_model))
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:3]
    got = evaluate.evaluate(model, tokenizer, examples, 256, 12, batch_size=2)
    assert got["generations"] == evaluate.generate(model, tokenizer, examples, 12)
    assert got["rows_generated"] == 3
    assert 0 < got["tokens_generated"] <= 3 * 12


def test_a_batch_without_answer_tokens_still_steps(tiny_model):
    """Rows cut short inside their prompt leave nothing to learn: the loss is 0, and backward
    works (the step is a no-op for the adapter)."""
    model = _lora_model(tiny_model)
    rows = [([1, 2, 3, 4], [-100] * 4), ([5, 6], [-100, -100])]
    loss = fast.loss(model, packing.pack(rows))
    loss.backward()
    assert float(loss) == 0.0


def test_static_eval_batches_grow_within_their_token_allowance():
    rows = [evaluate._Row([1] * 50, [2] * 10, [], 0.0, 10) for _ in range(24)]

    def sizes(*args):
        return [len(c) for c in evaluate._chunks(rows, *args)]

    assert sizes(8, None, None) == [8, 8, 8]  # no allowance (or plain decoding): the caller's batch
    assert sizes(8, 10**6, 40) == [24]  # room for all (at most MAX_CHUNK_ROWS)
    assert sizes(8, 90 * 12, 40) == [12, 12]  # 50 + max(10, 40) = 90 tokens a row: 12 rows
    assert sizes(8, 100, 40) == [8, 8, 8]  # never fewer than the caller's batch
    assert sizes(5, None, None) == [5, 5, 5, 5, 4]  # spread evenly


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_static_route_on_the_other_supported_decoders(
    tiny_model, small_data, own_greedy_cases, model_type, monkeypatch
):
    """The static cache is duck-typed against each architecture's attention: the other decoders
    of ``fast.SUPPORTED`` (tiny random ones) decode greedy's tokens on it too (on CPU, eagerly)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.synthetic import SHAPES

    monkeypatch.setattr(evaluate, "STATIC_DEVICES", {"cpu"})
    tokenizer = load_tokenizer(str(tiny_model))
    shape = SHAPES["tiny"]  # the tiny Llama's dimensions
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        **shape,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],  # Qwen3's default is 128
        max_position_embeddings=1024,
        sliding_window=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = attach_lora(base, rank=4, alpha=8, target_modules="all_linear", dropout=0.0).eval()
    assert evaluate._cache_reusable(model)
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:3]
    cases = own_greedy_cases(model, tokenizer, examples, 16)
    expected = evaluate.generate(model, tokenizer, cases, 16)
    got = evaluate.evaluate(model, tokenizer, cases, 256, 16, batch_size=3, chunk_tokens=10**6)
    assert got["generations"] == expected
    assert got["rows_generated"] == 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
def test_kept_decoding_graphs_decode_as_fresh_ones(
    tiny_model, small_data, own_greedy_cases, device, monkeypatch
):
    """``keep_graphs``: a batch's static cache and captured decoding steps serve the model's next
    eval (same shape) after its adapter changed in place, as training changes it between evals:
    the generations and loss are those of a fresh cache and capture, with other rows decoded each
    time; a weight that moved (another tensor) drops the kept state. On CUDA the kept steps replay
    their graph; on CPU they run eagerly. Evals run merged, as trials on a GPU run them."""
    from workers import lora

    monkeypatch.setattr(evaluate, "STATIC_DEVICES", {device})
    monkeypatch.setattr(lora, "MERGE_FOR_EVAL_DEVICES", {device})
    model = _lora_model(tiny_model).to(device).eval()
    tokenizer = load_tokenizer(str(tiny_model))
    examples = read_examples(small_data["validation"], "chat", "data.validation")[:4]
    cases = []
    for ex in examples[:2]:  # references the model generates exactly: not decoded at first
        ids = evaluate.generate_ids(model, tokenizer, [encode_prompt(tokenizer, ex)], [24])[0]
        answer = tokenizer.decode(ids, skip_special_tokens=True)
        cases.append(dataclasses.replace(ex, answer=answer))
    cases += own_greedy_cases(model, tokenizer, examples[2:], 24)

    def run(keep: bool) -> dict:
        with lora.merged_for_eval(model) as merged:
            assert merged
            return evaluate.evaluate(
                model, tokenizer, cases, 256, 24, batch_size=4, chunk_tokens=10**6, keep_graphs=keep
            )

    kept_steps, decoded = [], []
    torch.manual_seed(5)
    for turn in range(4):
        if turn == 3:  # a base weight replaced by another tensor: the kept graph is stale
            weight = fast.causal_lm(model).get_decoder().layers[0].mlp.down_proj.base_layer.weight
            weight.data = weight.data.clone()
        fresh, kept = run(False), run(True)
        assert kept["generations"] == fresh["generations"]
        assert kept["eval_loss"] == pytest.approx(fresh["eval_loss"], rel=1e-6)
        assert kept["tokens_generated"] == fresh["tokens_generated"] > 0
        decoded.append(fresh["rows_generated"])
        (entry,) = static_decode._kept[model].values()
        kept_steps.append(entry.steps)
        if device == "cuda":
            assert entry.steps.graph is not None
        with torch.no_grad():  # the adapter moves in place, as an optimizer step moves it
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.2)
    assert kept_steps[0] is kept_steps[1] is kept_steps[2]  # captured once, then replayed
    assert kept_steps[3] is not kept_steps[2]
    assert decoded[0] < 4 and max(decoded) == 4  # the kept steps first ran with rows left out
