"""Tests of mentor.lm.decode (the lean decoder) and of its use by mentor.lm.generate.

References: ``transformers``' own forward over the whole sequence (no cache) for the logits of every step, and
``sample(..., decoder="model")`` (the model's forward with its KV cache, the path the lean decoder replaces) for the
sampled tokens. Float32 models, so the two paths agree to rounding (about 1e-6) and every draw is the same.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers", reason="the lean decoder runs transformers models (mentor[lm])")

from mentor.lm import decode  # noqa: E402
from mentor.lm.decode import LeanDecoder, unsupported_reason  # noqa: E402
from mentor.lm.generate import _draw, position_ids_of, sample, speculative_sample  # noqa: E402
from mentor.lm.loop import prompts_of  # noqa: E402
from mentor.lm.models import tiny_llama  # noqa: E402

VOCAB = 64
EOS, PAD = 2, 0


def prompts(batch: int = 4, width: int = 7, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Left-padded prompts of different lengths (ids in [3, VOCAB))."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = (row * 3) % width  # 0, 3, 6, 2, ...: every row keeps at least one real token
        ids[row, :pad] = PAD
        mask[row, :pad] = 0
    return ids, mask


def llama(seed: int = 0, layers: int = 2, width: int = 64, **kw) -> nn.Module:
    return tiny_llama(layers, width, VOCAB, seed=seed, **kw).eval()


def llama_gqa(seed: int = 0) -> nn.Module:
    """Grouped-query attention (4 query heads, 2 key heads), head_dim 24 (not width / heads), biases everywhere,
    tied embeddings."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True,
                                   mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def mistral(seed: int = 0, **kw) -> nn.Module:
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    torch.manual_seed(seed)
    return transformers.MistralForCausalLM(cfg).eval()


def qwen2(seed: int = 0, **kw) -> nn.Module:
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, **kw)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()


MODELS = {
    "llama": lambda: llama(1),
    "llama-gqa-tied-bias-head_dim": lambda: llama_gqa(2),
    "llama-rope-linear": lambda: llama(3, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 500.0}),
    "llama-rope-llama3": lambda: llama(4, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
    "mistral": lambda: mistral(5),
    "qwen2": lambda: qwen2(6),
    "llama-float64": lambda: llama(7).double(),
}


def _perturb(m: nn.Module) -> nn.Module:
    """Non-trivial RMSNorm weights and biases (a random model starts at 1 and 0, which would hide a norm weight or
    a bias put in the wrong place)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_((0.5 if "norm" in name else 0.1) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lean_logits_equal_the_models_forward_at_every_step(name: str) -> None:
    m = _perturb(MODELS[name]())
    assert unsupported_reason(m, 64) is None
    ids, mask = prompts()
    steps = 9
    g = torch.Generator().manual_seed(1)
    fed = torch.randint(3, VOCAB, (ids.shape[0], steps), generator=g)  # teacher-forced continuation
    dec = LeanDecoder(m)
    got = [dec.start(ids, mask, steps)]
    for s in range(steps - 1):
        got.append(dec.step(fed[:, s]))
    full_ids = torch.cat([ids, fed], 1)
    full_mask = torch.cat([mask, torch.ones_like(fed)], 1)
    with torch.no_grad():
        want = m(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_of(full_mask)).logits
    width = ids.shape[1]
    for s, logits in enumerate(got):
        expected = want[:, width - 1 + s]
        tol = 1e-12 if expected.dtype == torch.float64 else 1e-5
        assert logits.dtype == expected.dtype
        torch.testing.assert_close(logits, expected, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "llama-gqa-tied-bias-head_dim"])
@pytest.mark.parametrize("top_p", [None, 0.7])
def test_lean_samples_are_the_models_samples(name: str, top_p: float | None) -> None:
    m = _perturb(MODELS[name]())
    ids, mask = prompts(batch=6)
    for seed in range(4):
        kw = {"max_new_tokens": 12, "temperature": 0.9, "top_p": top_p, "seed": seed, "eos_id": None,
              "pad_id": PAD}
        lean, generic = sample(m, ids, mask, decoder="lean", **kw), sample(m, ids, mask, decoder="model", **kw)
        assert torch.equal(lean.input_ids, generic.input_ids)
        assert torch.equal(lean.labels, generic.labels)
        assert torch.equal(lean.attention_mask, generic.attention_mask)


def test_auto_takes_the_lean_path_for_supported_models(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    starts: list[int] = []
    original = LeanDecoder.start

    def spy(self: LeanDecoder, *args: object) -> Tensor:
        starts.append(1)
        return original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(LeanDecoder, "start", spy)
    with caplog.at_level(logging.DEBUG, logger="mentor.lm.generate"):
        for build in (lambda: llama(0), lambda: mistral(0), lambda: qwen2(0)):
            sample(build().train(), *prompts(), max_new_tokens=3, seed=0, eos_id=EOS, pad_id=PAD)
    assert len(starts) == 3 and "lean decoder off" not in caplog.text


def test_lean_greedy_and_eos_equal_the_models() -> None:
    m = llama(8)
    ids, mask = prompts(batch=6)
    for temperature in (0.0, 1.3):
        kw = {"max_new_tokens": 10, "temperature": temperature, "seed": 5, "pad_id": PAD}
        free = sample(m, ids, mask, eos_id=None, decoder="lean", **kw)
        assert torch.equal(free.input_ids, sample(m, ids, mask, eos_id=None, decoder="model", **kw).input_ids)
        eos = int(free.completions[0, 3])  # row 0 stops after at most four tokens, the others where that id appears
        lean = sample(m, ids, mask, eos_id=eos, decoder="lean", **kw)
        generic = sample(m, ids, mask, eos_id=eos, decoder="model", **kw)
        assert torch.equal(lean.input_ids, generic.input_ids)
        assert torch.equal(lean.completion_mask, generic.completion_mask)
        assert lean.completion_mask[0, 4:].eq(0).all() and lean.completion_mask[:, -1].eq(1).any()


def test_lean_samples_from_the_loops_right_padded_rows() -> None:
    """The on-policy hook's input: right-padded rows with shifted labels, cut back to left-padded prompts."""
    m = llama(9)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(3, VOCAB, (5, 10), generator=g)
    y = torch.full_like(x, -100)
    for row, (prompt, answer) in enumerate([(3, 2), (6, 3), (1, 4), (4, 1), (8, 1)]):
        y[row, prompt - 1: prompt - 1 + answer] = x[row, prompt: prompt + answer]
        x[row, prompt + answer:] = PAD
    ids, mask = prompts_of(x, y, PAD)
    assert mask[:, 0].eq(0).any()  # prompts of different lengths
    for seed in range(3):
        kw = {"max_new_tokens": 8, "temperature": 1.0, "seed": seed, "eos_id": EOS, "pad_id": PAD,
              "vocab_size": VOCAB - 4}
        assert torch.equal(sample(m, ids, mask, decoder="lean", **kw).input_ids,
                           sample(m, ids, mask, decoder="model", **kw).input_ids)


def test_lean_speculative_sampling_equals_the_models() -> None:
    student, teacher = llama(10, layers=1), mistral(11)
    ids, mask = prompts()
    for seed in range(3):
        kw = {"max_new_tokens": 10, "top_k": 4, "temperature": 1.1, "seed": seed, "eos_id": EOS, "pad_id": PAD}
        lean = speculative_sample(student, teacher, ids, mask, decoder="lean", **kw)
        generic = speculative_sample(student, teacher, ids, mask, decoder="model", **kw)
        assert torch.equal(lean.input_ids, generic.input_ids) and torch.equal(lean.replaced, generic.replaced)
        assert lean.replaced.any()


def test_lean_samples_are_ordinary_tensors_that_train() -> None:
    """The loop runs under inference mode; what it returns must still go through a training forward/backward."""
    m = llama(13).train()
    ids, mask = prompts()
    got = sample(m, ids, mask, max_new_tokens=5, temperature=1.0, seed=0, eos_id=None, pad_id=PAD, decoder="lean")
    fields = (got.input_ids, got.attention_mask, got.position_ids, got.labels, got.completions, got.completion_mask)
    assert not any(t.is_inference() for t in fields)
    out = m(input_ids=got.input_ids, attention_mask=got.attention_mask, position_ids=got.position_ids,
            labels=got.labels)
    out.loss.backward()
    assert m.model.embed_tokens.weight.grad is not None and m.training


def test_lean_decoder_reads_the_weights_of_each_call() -> None:
    m = llama(12)
    ids, mask = prompts()
    kw = {"max_new_tokens": 6, "temperature": 0, "seed": 0, "eos_id": None, "pad_id": PAD, "decoder": "lean"}
    before = sample(m, ids, mask, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = sample(m, ids, mask, **kw)
    assert not torch.equal(before.completions, after.completions)
    assert torch.equal(after.input_ids, sample(m, ids, mask, **{**kw, "decoder": "model"}).input_ids)


def test_the_exponential_race_draws_what_multinomial_draws() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 200, generator=g) * 3
    for top_p in (None, 0.6):
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        for _ in range(50):
            z = logits / 0.7
            if top_p is not None:
                from mentor.lm.generate import filter_top_p

                z = filter_top_p(z, top_p)
            want = torch.multinomial(z.softmax(-1), 1, generator=g2).squeeze(-1)
            assert torch.equal(_draw(logits, 0.7, top_p, g1), want)
    with pytest.raises(ValueError, match="NaN or infinite"):
        _draw(torch.full((2, 5), float("nan")), 1.0, None, g)


class _Sub(nn.Linear):
    pass


def _unsupported_cases() -> dict[str, tuple[nn.Module, str]]:
    hooked = llama(0)
    hooked.register_forward_pre_hook(lambda module, args: None)
    inner_hook = llama(0)
    inner_hook.model.layers[1].mlp.register_forward_hook(lambda module, args, out: None)
    adapter = llama(0)
    old = adapter.model.layers[0].self_attn.q_proj
    adapter.model.layers[0].self_attn.q_proj = _Sub(old.in_features, old.out_features, bias=False)

    class MyLlama(transformers.LlamaForCausalLM):  # type: ignore[misc]
        pass

    sub = MyLlama(llama(0).config)
    return {
        "hook on the model": (hooked, "forward hooks"),
        "hook on a layer": (inner_hook, "'model.layers.1.mlp' has forward hooks"),
        "adapter": (adapter, "not plain nn.Linear"),
        "subclass": (sub, "is not a stock"),
        "bfloat16": (llama(0).to(torch.bfloat16), "dtype torch.bfloat16"),
        "gelu": (llama(0, hidden_act="gelu"), "hidden_act='gelu'"),
        "dynamic rope": (llama(0, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
                         "rotary type 'dynamic'"),
        "sliding window": (mistral(0, sliding_window=8), "sliding_window=8"),
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                                      vocab_size=VOCAB)), "not a stock"),
    }


@pytest.mark.parametrize("case", sorted(_unsupported_cases()))
def test_unsupported_models_fall_back_to_their_own_forward(case: str, caplog: pytest.LogCaptureFixture) -> None:
    m, reason = _unsupported_cases()[case]
    ids, mask = prompts()
    assert reason in (unsupported_reason(m, ids.shape[1] + 12) or "")
    kw = {"max_new_tokens": 12, "temperature": 1.0, "seed": 3, "eos_id": None, "pad_id": PAD}
    with pytest.raises(ValueError, match="decoder='lean' does not apply"):
        sample(m, ids, mask, decoder="lean", **kw)
    with caplog.at_level(logging.DEBUG, logger="mentor.lm.generate"):
        auto = sample(m, ids, mask, **kw)
    assert "lean decoder off" in caplog.text and reason in caplog.text
    assert torch.equal(auto.input_ids, sample(m, ids, mask, decoder="model", **kw).input_ids)


def test_supported_checks_cover_autocast_length_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    m = mistral(0, sliding_window=8)
    assert unsupported_reason(m, 8) is None and "sliding_window" in (unsupported_reason(m, 9) or "")
    assert unsupported_reason(qwen2(0, sliding_window=4), 64) is None  # not used: use_sliding_window is off
    plain = llama(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in (unsupported_reason(plain) or "")
    monkeypatch.setattr(decode, "MAX_JOINED_BYTES", decode.joined_bytes(plain) - 1)
    assert "MAX_JOINED_BYTES" in (unsupported_reason(plain) or "")
    with pytest.raises(ValueError, match="decoder must be one of"):
        sample(plain, *prompts(), max_new_tokens=2, seed=0, eos_id=None, pad_id=PAD, decoder="fast")
