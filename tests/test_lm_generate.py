"""Tests of mentor.lm.generate: KV-cached sampling, GKD's on/off-policy choice, speculative KD's interleaving.

References: ``transformers``' own ``generate`` (greedy), and a loop written here that re-runs the whole sequence
without any cache at every step and draws from generators seeded the same way (float64 models, so the cached and
uncached logits agree to ~1e-15 and every draw is the same).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

pytest.importorskip("transformers", reason="mentor.lm.generate is tested on transformers models (mentor[lm])")

from mentor.lm import data
from mentor.lm.generate import (
    choose_on_policy,
    filter_top_p,
    on_policy_at,
    position_ids_of,
    sample,
    speculative_sample,
)
from mentor.lm.losses import count_targets, token_kd
from mentor.lm.models import final_hidden, output_head, tiny_llama

VOCAB = 64
EOS, PAD = 2, 0


def prompts() -> tuple[Tensor, Tensor]:
    """Left-padded prompts of different lengths (ids in [3, VOCAB))."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 4, 1]):
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


def model(seed: int, layers: int = 1, width: int = 64, dtype: torch.dtype = torch.float64, **kw):
    return tiny_llama(layers, width, VOCAB, seed=seed, **kw).to(dtype)


def reference_sample(m, ids, mask, *, steps, temperature, seed, eos_id, top_p=None) -> Tensor:
    """No cache: the whole sequence runs again at every step; same draws as mentor's sampler."""
    g = torch.Generator().manual_seed(seed)
    seq, att = ids.clone(), mask.clone()
    running = torch.ones(ids.shape[0], dtype=torch.bool)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = m(input_ids=seq, attention_mask=att, position_ids=position_ids_of(att), use_cache=False).logits
            z = logits[:, -1]
            if temperature == 0:
                tok = z.argmax(-1)
            else:
                z = z.float() / temperature
                if top_p is not None:
                    z = filter_top_p(z, top_p)
                tok = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(-1)
            out.append(torch.where(running, tok, torch.full_like(tok, PAD)))
            if eos_id is not None:
                running &= tok != eos_id
            if not running.any():
                break
            seq = torch.cat([seq, tok[:, None]], 1)
            att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
    return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------------------- sample


def test_greedy_sampling_equals_transformers_generate() -> None:
    m = model(1, dtype=torch.float32)
    ids, mask = prompts()
    got = sample(m, ids, mask, max_new_tokens=7, temperature=0, seed=0, eos_id=None, pad_id=PAD)
    want = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=PAD,
                      eos_token_id=None, use_cache=True)
    assert torch.equal(got.input_ids, want)
    assert got.prompt_length == 6 and got.completions.shape == (4, 7)


@pytest.mark.parametrize("top_p", [None, 0.8])
def test_cached_sampling_equals_an_uncached_reference(top_p: float | None) -> None:
    m = model(2)
    ids, mask = prompts()
    got = sample(m, ids, mask, max_new_tokens=9, temperature=0.8, top_p=top_p, seed=11, eos_id=None, pad_id=PAD)
    want = reference_sample(m, ids, mask, steps=9, temperature=0.8, seed=11, eos_id=None, top_p=top_p)
    assert torch.equal(got.completions, want)


def test_sampling_is_reproducible_and_leaves_the_global_generator_alone() -> None:
    m = model(3, dtype=torch.float32)
    ids, mask = prompts()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = sample(m, ids, mask, max_new_tokens=10, temperature=1.0, seed=7, eos_id=None, pad_id=PAD)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state changes nothing
    b = sample(m, ids, mask, max_new_tokens=10, temperature=1.0, seed=7, eos_id=None, pad_id=PAD)
    c = sample(m, ids, mask, max_new_tokens=10, temperature=1.0, seed=8, eos_id=None, pad_id=PAD)
    assert torch.equal(a.completions, b.completions)
    assert not torch.equal(a.completions, c.completions)


def test_dropout_is_off_while_sampling_and_the_mode_is_restored() -> None:
    m = model(4, dtype=torch.float32, attention_dropout=0.5)
    m.train()
    ids, mask = prompts()
    state = torch.get_rng_state()
    a = sample(m, ids, mask, max_new_tokens=5, temperature=0, seed=0, eos_id=None, pad_id=PAD)
    b = sample(m, ids, mask, max_new_tokens=5, temperature=0, seed=0, eos_id=None, pad_id=PAD)
    assert m.training and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.completions, b.completions)


def test_rows_stop_at_eos_and_labels_are_ready_for_token_kd() -> None:
    m = model(1, dtype=torch.float32)
    ids, mask = prompts()
    free = sample(m, ids, mask, max_new_tokens=8, temperature=0, seed=0, eos_id=None, pad_id=PAD)
    eos = int(free.completions[0, 2])  # row 0 stops after its third token; other rows wherever that id appears
    got = sample(m, ids, mask, max_new_tokens=8, temperature=0, seed=0, eos_id=eos, pad_id=PAD)
    P = got.prompt_length
    for row in range(4):
        toks = free.completions[row].tolist()
        n = toks.index(eos) + 1 if eos in toks else len(toks)
        width = got.completions.shape[1]
        assert got.completions[row, :n].tolist() == toks[:n]
        assert got.completion_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert got.completions[row, n:].eq(PAD).all()
        assert got.labels[row, :P].eq(-100).all()
        assert got.labels[row, P : P + n].tolist() == toks[:n]
        assert got.labels[row, P + n :].eq(-100).all()
    assert torch.equal(got.attention_mask[:, :P], mask)
    assert torch.equal(got.position_ids, position_ids_of(got.attention_mask))
    assert got.num_tokens == count_targets(got.labels) == int(got.completion_mask.sum())
    # the result feeds token KD directly: one scoring pass per model over prompt + completion
    teacher = model(9, dtype=torch.float32)
    hs = final_hidden(m, got.input_ids, got.attention_mask)
    ht = final_hidden(teacher, got.input_ids, got.attention_mask)
    loss = token_kd(hs, output_head(m), ht, output_head(teacher), got.labels, divergence="jsd")
    assert torch.isfinite(loss) and loss > 0


def test_filter_top_p_by_hand() -> None:
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert filter_top_p(logits, 0.7).isfinite().tolist() == [[False, True, False, True]]  # 0.5 + 0.3 >= 0.7
    assert filter_top_p(logits, 0.5).isfinite().tolist() == [[False, True, False, False]]
    assert filter_top_p(logits, 0.81).isfinite().tolist() == [[True, True, False, True]]
    assert torch.equal(filter_top_p(logits, 1.0), logits)


def test_bad_arguments_are_refused() -> None:
    m = model(1, dtype=torch.float32)
    ids, mask = prompts()
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        sample(m, ids, right, max_new_tokens=2, seed=0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="temperature must be"):
        sample(m, ids, mask, max_new_tokens=2, temperature=-1, seed=0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="top_p must be"):
        sample(m, ids, mask, max_new_tokens=2, top_p=0.0, seed=0, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        sample(m, ids, mask, max_new_tokens=-1, seed=0, eos_id=EOS, pad_id=PAD)
    empty = sample(m, ids, mask, max_new_tokens=0, seed=0, eos_id=EOS, pad_id=PAD)
    assert empty.completions.shape == (4, 0) and empty.labels.eq(-100).all()


def test_vocab_size_restricts_sampling_to_the_shared_range() -> None:
    m = model(1, dtype=torch.float32)
    ids, mask = prompts()
    got = sample(m, ids, mask, max_new_tokens=20, temperature=3.0, seed=1, eos_id=None, pad_id=PAD, vocab_size=10)
    assert int(got.completions.max()) < 10


# ------------------------------------------------------------------------------------------------------ GKD mixing


def test_on_policy_choice_follows_lambda_under_a_seed() -> None:
    g = torch.Generator().manual_seed(0)
    assert not any(choose_on_policy(0.0, g) for _ in range(200))
    assert all(choose_on_policy(1.0, g) for _ in range(200))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [choose_on_policy(0.3, g1) for _ in range(4000)]
    assert a == [choose_on_policy(0.3, g2) for _ in range(4000)]
    assert sum(a) / len(a) == pytest.approx(0.3, abs=0.025)
    state = torch.get_rng_state()
    steps = [on_policy_at(s, 0.5, seed=1) for s in range(400)]
    assert steps == [on_policy_at(s, 0.5, seed=1) for s in range(400)]  # a resumed run decides the same
    assert 0.4 < sum(steps) / 400 < 0.6
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="lmbda must be"):
        choose_on_policy(1.5, g)


# -------------------------------------------------------------------------------------------------------------- SKD


def test_skd_with_k_equal_to_the_vocabulary_replaces_nothing() -> None:
    student, teacher = model(1), model(2, layers=2)
    ids, mask = prompts()
    got = speculative_sample(student, teacher, ids, mask, max_new_tokens=8, top_k=VOCAB, temperature=1.0, seed=4,
                             eos_id=None, pad_id=PAD)
    plain = sample(student, ids, mask, max_new_tokens=8, temperature=1.0, seed=4, eos_id=None, pad_id=PAD)
    assert not got.replaced.any()
    assert torch.equal(got.input_ids, plain.input_ids) and torch.equal(got.labels, plain.labels)


def test_skd_with_k_one_and_a_greedy_teacher_gives_the_teachers_argmax() -> None:
    student, teacher = model(1), model(2, layers=2)
    ids, mask = prompts()
    got = speculative_sample(student, teacher, ids, mask, max_new_tokens=8, top_k=1, temperature=1.0,
                             teacher_temperature=0, seed=4, eos_id=None, pad_id=PAD)
    greedy = sample(teacher, ids, mask, max_new_tokens=8, temperature=0, seed=0, eos_id=None, pad_id=PAD)
    assert torch.equal(got.completions, greedy.completions)
    # a greedy student that is the teacher proposes the arg-max itself: nothing is replaced, same tokens
    same = speculative_sample(teacher, teacher, ids, mask, max_new_tokens=8, top_k=1, temperature=0, seed=4,
                              eos_id=None, pad_id=PAD)
    assert not same.replaced.any() and torch.equal(same.completions, greedy.completions)


def test_skd_interleaving_matches_an_uncached_reference() -> None:
    student, teacher = model(1), model(2, layers=2)
    ids, mask = prompts()
    k, steps, seed = 5, 8, 3
    got = speculative_sample(student, teacher, ids, mask, max_new_tokens=steps, top_k=k, temperature=1.2,
                             seed=seed, eos_id=None, pad_id=PAD)
    gs, gt = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    seq, att = ids.clone(), mask.clone()
    toks, repl = [], []
    with torch.no_grad():
        for _ in range(steps):
            kw = {"attention_mask": att, "position_ids": position_ids_of(att), "use_cache": False}
            zs = student(input_ids=seq, **kw).logits[:, -1]
            zt = teacher(input_ids=seq, **kw).logits[:, -1]
            y_s = torch.multinomial((zs.float() / 1.2).softmax(-1), 1, generator=gs).squeeze(-1)
            y_t = torch.multinomial((zt.float() / 1.2).softmax(-1), 1, generator=gt).squeeze(-1)
            rank = (zt > zt.gather(1, y_s[:, None])).sum(1)  # tokens strictly more probable than the proposal
            keep = rank < k
            tok = torch.where(keep, y_s, y_t)
            toks.append(tok)
            repl.append(~keep)
            seq, att = torch.cat([seq, tok[:, None]], 1), torch.cat([att, torch.ones_like(att[:, :1])], 1)
    assert torch.equal(got.completions, torch.stack(toks, 1))
    assert torch.equal(got.replaced, torch.stack(repl, 1))
    assert got.replaced.any()


def test_skd_refuses_different_vocabularies() -> None:
    student = model(1)
    teacher = tiny_llama(1, 64, VOCAB + 8, seed=2).double()
    ids, mask = prompts()
    with pytest.raises(ValueError, match=f"student has {VOCAB} logits but teacher has {VOCAB + 8}"):
        speculative_sample(student, teacher, ids, mask, max_new_tokens=2, top_k=2, seed=0, eos_id=EOS, pad_id=PAD)
    got = speculative_sample(student, teacher, ids, mask, max_new_tokens=2, top_k=2, seed=0, eos_id=EOS,
                             pad_id=PAD, vocab_size=VOCAB)
    assert got.completions.shape[0] == 4


def test_task_prompts_from_the_builtin_task_sample() -> None:
    tok = data.tokenizer()
    enc = data.encode_task(data.arithmetic(3, seed=2), tok)
    m = tiny_llama(1, 64, len(tok), seed=0)
    got = sample(m, enc.prompt_ids, enc.prompt_mask, max_new_tokens=4, temperature=1.0, seed=0,
                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert got.input_ids.shape == (3, enc.prompt_ids.shape[1] + got.completions.shape[1])
    assert len(data.decode_completions(tok, got.completions)) == 3
