"""Sampler: greedy parity, filter supports and distributions, per-request reproducibility, penalties,
min_new_tokens, logprobs. Seeds are fixed, so the statistical checks are deterministic."""
from __future__ import annotations

import math

import pytest
import torch

from sglang_duet.sampling import Sampler, SamplingRow, step_seed
from sglang_duet.sampling.penalties import apply_penalties
from sglang_duet.sampling_params import SamplingParams


def row(params=None, seed=0, prompt=(), output=(), eos=()):
    return SamplingRow(params or SamplingParams(), seed, list(prompt), list(output), list(eos))


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    """n samples of one distribution, one per seed, all in one batch; returns counts per token."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    out = Sampler()(logits, [row(params, seed=s) for s in range(n)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits_row.numel())


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().item()
    keep = probs > 0
    exp = probs[keep] * n
    return (((counts[keep].double() - exp) ** 2) / exp).sum().item()


# ---- greedy -------------------------------------------------------------------------------------


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    before = logits.clone()
    for p in (SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=0.8)):
        out = Sampler()(logits, [row(p, seed=i) for i in range(8)])
        assert out.token_ids == logits.argmax(-1).tolist()
        assert out.logprobs == [None] * 8
    assert torch.equal(logits, before)  # input untouched


def test_mixed_batch_greedy_rows_are_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(6)]
    out = Sampler()(logits, [row(p, seed=i) for i, p in enumerate(params)])
    for i in range(0, 6, 2):
        assert out.token_ids[i] == int(logits[i].argmax())


def test_bf16_input_and_vocab_padding():
    logits = torch.full((2, 12), -5.0)
    logits[:, 3] = 2.0
    logits[:, 10:] = 50.0  # padding columns past the real vocabulary
    out = Sampler(vocab_size=10)(logits.bfloat16(), [row(SamplingParams(temperature=0.0)), row(seed=3)])
    assert out.token_ids[0] == 3 and out.token_ids[1] < 10


# ---- filters and distributions ------------------------------------------------------------------


def test_temperature_distribution_matches_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    counts = draw_many(logits, SamplingParams(temperature=0.7))
    assert chi2(counts, torch.softmax(logits / 0.7, -1)) < 25.0  # dof 5


def test_top_k_support_and_distribution():
    torch.manual_seed(2)
    logits = torch.randn(16)
    counts = draw_many(logits, SamplingParams(top_k=4))
    allowed = set(logits.topk(4).indices.tolist())
    assert set(counts.nonzero().flatten().tolist()) == allowed
    probs = torch.zeros(16)
    idx = torch.tensor(sorted(allowed))
    probs[idx] = torch.softmax(logits[idx], -1)
    assert chi2(counts, probs) < 20.0


def test_top_p_support_and_ratio():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()
    counts = draw_many(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.25 reaches 0.7; 0.15 not needed
    assert counts[2] == 0 and counts[3] == 0
    assert chi2(counts, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])) < 12.0


def test_top_k_then_top_p_on_renormalised_mass():
    # vLLM/HF order: after top_k=2 the mass is [4/7, 3/7]; 4/7 >= 0.5 already, so only token 0.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    counts = draw_many(logits, SamplingParams(top_k=2, top_p=0.5), n=500)
    assert counts.tolist() == [500, 0, 0, 0]


def test_min_p_support():
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()
    counts = draw_many(logits, SamplingParams(min_p=0.25))  # threshold 0.125: drop token 3
    assert counts[3] == 0 and all(c > 0 for c in counts[:3].tolist())
    assert chi2(counts, torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9) < 15.0


def test_mixed_filters_in_one_batch():
    torch.manual_seed(3)
    logits = torch.randn(4, 32)
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.3), SamplingParams(min_p=0.5), SamplingParams()]
    for s in range(50):
        out = Sampler()(logits, [row(p, seed=s) for p in params])
        assert out.token_ids[0] in logits[0].topk(3).indices.tolist()
        probs = torch.softmax(logits[1], -1)
        sp, order = probs.sort(descending=True)
        nucleus = order[: int(((sp.cumsum(0) - sp) < 0.3).sum())].tolist()
        assert out.token_ids[1] in nucleus
        p2 = torch.softmax(logits[2], -1)
        assert p2[out.token_ids[2]] >= 0.5 * p2.max()
    # Top-k without top-p takes the topk (no full sort) path; a row without top-k must stay unfiltered.
    seen = set()
    for s in range(200):
        out = Sampler()(logits[:2], [row(SamplingParams(top_k=2), seed=s), row(seed=s)])
        assert out.token_ids[0] in logits[0].topk(2).indices.tolist()
        seen.add(out.token_ids[1])
    assert len(seen) > 20


# ---- reproducibility ----------------------------------------------------------------------------


def test_same_seed_and_step_same_token_regardless_of_batch():
    torch.manual_seed(4)
    target_logits = torch.randn(1000) * 0.1  # nearly flat: a different draw would show
    p = SamplingParams(temperature=1.0, top_p=0.95)
    target = row(p, seed=1234, output=[7, 8, 9])
    alone = Sampler()(target_logits.unsqueeze(0), [target]).token_ids[0]

    others = [
        row(SamplingParams(temperature=0.0), seed=1),
        row(SamplingParams(temperature=0.5, top_k=10), seed=2, output=[1]),
        row(SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5), seed=3, prompt=[4, 5], output=[4]),
    ]
    other_logits = torch.randn(3, 1000)
    for pos in range(4):
        batch = others[:pos] + [target] + others[pos:]
        logits = torch.cat([other_logits[:pos], target_logits.unsqueeze(0), other_logits[pos:]])
        assert Sampler()(logits, batch).token_ids[pos] == alone
    # Recompute after retraction: a fresh sampler, different (same-length) history -> same noise.
    again = row(p, seed=1234, output=[1, 2, 3])
    assert Sampler()(target_logits.unsqueeze(0), [again]).token_ids[0] == alone


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(1, 1000)
    by_seed = {Sampler()(logits, [row(seed=s)]).token_ids[0] for s in range(40)}
    by_step = {Sampler()(logits, [row(seed=5, output=[0] * k)]).token_ids[0] for k in range(40)}
    assert len(by_seed) > 30 and len(by_step) > 30
    assert step_seed(1, 2) != step_seed(2, 1) and step_seed(-1, 0) != step_seed(0, 0)
    assert 0 <= step_seed(2**100, 3) < 2**64


# ---- penalties and min_new_tokens ---------------------------------------------------------------


def test_penalties_hand_computed():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(logits, p, prompt_ids=[0], output_ids=[1, 1, 3])
    # token 0 (prompt): 2/2 = 1; token 1 (out x2): -2*2 - 0.5*2 - 0.25 = -5.25;
    # token 3 (out x1): 0.5/2 - 0.5 - 0.25 = -0.5; tokens 2, 4 untouched.
    assert torch.allclose(logits, torch.tensor([1.0, -5.25, 1.0, -0.5, 3.0]))


def test_frequency_presence_only_count_output_tokens():
    logits = torch.zeros(4)
    apply_penalties(logits, SamplingParams(frequency_penalty=1.0, presence_penalty=1.0), [2, 2, 2], [1])
    assert logits.tolist() == [0.0, -2.0, 0.0, 0.0]


def test_penalties_change_greedy_choice_and_logprobs():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=True, top_logprobs=3)
    out = Sampler()(logits, [row(p, prompt=[0])])
    assert out.token_ids == [1]
    expected = torch.log_softmax(torch.tensor([2.0, 2.9, 0.0]), -1)
    assert math.isclose(out.logprobs[0]["logprob"], expected[1].item(), rel_tol=1e-5)


def test_min_new_tokens_bans_eos():
    logits = torch.tensor([[0.0, 1.0, 10.0, 9.0]])  # eos = 2, stop token id = 3
    p = SamplingParams(temperature=0.0, min_new_tokens=2, logprobs=True)
    out = Sampler()(logits, [row(p, output=[1], eos=[2, 3])])
    assert out.token_ids == [1] and out.logprobs[0]["logprob"] > -1e9
    lp = Sampler()(logits, [row(SamplingParams(min_new_tokens=2, logprobs=True, top_logprobs=4),
                                output=[1], eos=[2, 3])]).logprobs[0]
    assert dict(lp["top"])[2] == float("-inf")
    assert Sampler()(logits, [row(p, output=[1, 1], eos=[2, 3])]).token_ids == [2]
    # Sampled rows are banned too.
    for s in range(30):
        t = Sampler()(logits, [row(SamplingParams(min_new_tokens=1), seed=s, eos=[2, 3])]).token_ids[0]
        assert t not in (2, 3)


# ---- logprobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.3])
def test_logprobs_are_pre_temperature_log_softmax(temperature):
    torch.manual_seed(5)
    logits = torch.randn(3, 40)
    params = [
        SamplingParams(temperature=temperature, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=temperature),
        SamplingParams(temperature=temperature, logprobs=True, top_logprobs=0, top_k=3),
    ]
    out = Sampler()(logits, [row(p, seed=9) for p in params])
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        lp = out.logprobs[i]
        assert lp["token_id"] == out.token_ids[i]
        assert math.isclose(lp["logprob"], ref[i, out.token_ids[i]].item(), rel_tol=1e-5, abs_tol=1e-6)
    top = out.logprobs[0]["top"]
    assert len(top) == 5 and out.logprobs[2]["top"] == []
    vals, ids = ref[0].topk(5)
    assert [t for t, _ in top] == ids.tolist()
    assert all(math.isclose(v, r, rel_tol=1e-5) for (_, v), r in zip(top, vals.tolist()))


def test_empty_batch_and_shape_check():
    assert Sampler()(torch.zeros(0, 5), []).token_ids == []
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [row()])
