"""Tests of mentor.lm.models (tiny Llama teacher and student) and of chunked token KD on real causal LMs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="mentor.lm.models needs the 'transformers' package (mentor[lm])")

from mentor.lm import data
from mentor.lm.losses import count_targets, divergence, token_kd, token_kd_from_logits
from mentor.lm.models import final_hidden, output_head, output_size, tiny_llama, tiny_student, tiny_teacher

VOCAB = 512


def batch(n: int = 4, length: int = 48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arithmetic prompt/answer sequences: real masking (prompt and padding at -100) on a built-in task."""
    tok = data.tokenizer()
    enc = data.encode_task(data.arithmetic(n, seed=5), tok)
    return enc.input_ids, enc.attention_mask, enc.labels


def test_tiny_models_have_the_reference_shapes() -> None:
    teacher, student = tiny_teacher(VOCAB), tiny_student(VOCAB)
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size) == (4, 256)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 128)
    assert (teacher.config.num_attention_heads, student.config.num_attention_heads) == (4, 2)
    assert (teacher.config.intermediate_size, student.config.intermediate_size) == (704, 352)
    assert output_size(teacher) == output_size(student) == VOCAB
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert 3_000_000 < n_teacher < 4_000_000 and 400_000 < n_student < 700_000
    tied = tiny_llama(1, 64, 100, tie_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    with pytest.raises(ValueError, match="heads must be a positive divisor of width=128"):
        tiny_llama(1, 128, 100, heads=3)
    with pytest.raises(ValueError, match="vocab must be a positive integer"):
        tiny_llama(1, 64, 0)


def test_seeded_construction_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_student(VOCAB, seed=7)
    after = torch.rand(3)
    b = tiny_student(VOCAB, seed=7)
    c = tiny_student(VOCAB, seed=8)
    assert torch.equal(after, expected)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_final_hidden_and_output_head_give_the_logits() -> None:
    model = tiny_student(VOCAB)
    ids, mask, _ = batch()
    logits = model(input_ids=ids, attention_mask=mask).logits
    hidden = final_hidden(model, ids, mask)
    assert hidden.shape == (*ids.shape, 128)
    torch.testing.assert_close(output_head(model)(hidden), logits)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_chunked_kd_on_real_models_matches_dense_logits(name: str) -> None:
    teacher, student = tiny_teacher(VOCAB, seed=1), tiny_student(VOCAB, seed=2)
    teacher.eval()
    ids, mask, labels = batch()
    div = divergence(name, temperature=2.0)
    params = [p for p in student.parameters() if p.requires_grad]
    # the dense reference: both models' full logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    dense = token_kd_from_logits(student(input_ids=ids, attention_mask=mask).logits, t_logits, labels, divergence=div)
    want = torch.autograd.grad(dense, params)
    with torch.no_grad():
        t_hidden = final_hidden(teacher, ids, mask)
    chunked = token_kd(
        final_hidden(student, ids, mask), output_head(student), t_hidden, output_head(teacher), labels,
        divergence=div, chunk_size=5,
    )
    got = torch.autograd.grad(chunked, params)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-7)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient_and_accumulation_matches_one_batch() -> None:
    teacher, student = tiny_teacher(VOCAB, seed=1), tiny_student(VOCAB, seed=2)
    ids, mask, labels = batch(6)
    total = count_targets(labels)

    def loss(rows: slice, num_items: int | None) -> torch.Tensor:
        return token_kd(
            final_hidden(student, ids[rows], mask[rows]), output_head(student),
            final_hidden(teacher, ids[rows], mask[rows]), output_head(teacher), labels[rows],
            divergence="reverse_kl", num_items=num_items, chunk_size=7,
        )

    loss(slice(0, 2), total).backward()
    loss(slice(2, 6), total).backward()
    accumulated = [p.grad.clone() for p in student.parameters()]
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()
    loss(slice(0, 6), None).backward()
    for a, p in zip(accumulated, student.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_padded_teacher_vocabulary() -> None:
    tok = data.tokenizer()
    teacher = tiny_teacher(len(tok) + 8, seed=1)  # 520 rows: padded to a multiple of 8
    student = tiny_student(len(tok), seed=2)
    ids, mask, labels = batch()
    s_hidden = final_hidden(student, ids, mask)
    with torch.no_grad():
        t_hidden = final_hidden(teacher, ids, mask)
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(ValueError, match="student has 512 logits but teacher has 520"):
        token_kd(s_hidden, output_head(student), t_hidden, output_head(teacher), labels)
    got = token_kd(s_hidden, output_head(student), t_hidden, output_head(teacher), labels, vocab_size=len(tok))
    want = token_kd_from_logits(output_head(student)(s_hidden), t_logits[..., :512], labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
