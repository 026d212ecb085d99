"""The graph-safe device sampler (kernels/gpu_sampling.py) against the CPU sampler, on CPU tensors.

Both draw the same counter-based noise, so seeded rows must pick the very same tokens, not merely
follow the same distribution."""
from __future__ import annotations

import torch

from sglang_duet.kernels import gpu_sampling
from sglang_duet.sampling import Sampler, SamplingRow
from sglang_duet.sampling.sampler import hash32, race_log_noise
from sglang_duet.sampling_params import SamplingParams


def _cpu(logits, params, seeds, steps, vocab=None):
    rows = [SamplingRow(p, s, [], [0] * k) for p, s, k in zip(params, seeds, steps)]
    return Sampler(vocab_size=vocab)(logits, rows).token_ids


def _dev(logits, params, seeds, steps, vocab, filters=True):
    st = gpu_sampling.SamplingTensors.build(params, seeds, steps, vocab, logits.device)
    return gpu_sampling.sample(logits, st, vocab=vocab, filters=filters).tolist()


def test_greedy_identical():
    torch.manual_seed(0)
    logits = torch.randn(16, 300)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: both pick the first maximum
    params = [SamplingParams(temperature=0.0)] * 16
    assert gpu_sampling.greedy(logits).tolist() == _cpu(logits, params, range(16), [0] * 16)
    assert _dev(logits, params, range(16), [0] * 16, 300) == _cpu(logits, params, range(16), [0] * 16)


def test_seeded_identical_mixed_params():
    torch.manual_seed(1)
    V = 257
    logits = torch.randn(12, V + 3) * 2  # 3 padding columns past the vocabulary
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.5),
        SamplingParams(temperature=0.9, min_p=0.1),
    ] * 2
    seeds = [11, 22, 33, 44, 55, 66, 2**62 + 5, 7, 8, 9, 10, 2**63 - 1]
    steps = [0, 1, 2, 3, 4, 5, 6, 7, 100, 1000, 3, 0]
    for trial in range(5):
        st = [s + trial for s in steps]
        assert _dev(logits, params, seeds, st, V) == _cpu(logits, params, seeds, st, vocab=V)


def test_unfiltered_variant_matches_when_no_filters():
    torch.manual_seed(2)
    logits = torch.randn(8, 100)
    params = [SamplingParams(temperature=t) for t in (0.0, 0.5, 1.0, 2.0)] * 2
    seeds, steps = list(range(8)), [3] * 8
    assert not gpu_sampling.needs_filters(params, 100)
    assert _dev(logits, params, seeds, steps, 100, filters=False) == _cpu(logits, params, seeds, steps)
    assert gpu_sampling.needs_filters([SamplingParams(top_p=0.9)], 100)


def test_static_buffers_padding_rows_are_greedy():
    torch.manual_seed(3)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=1.0, top_k=3)] * 2
    src = gpu_sampling.SamplingTensors.build(params, [1, 2], [0, 0], 50, "cpu")
    buf = gpu_sampling.SamplingTensors.empty(4, "cpu")
    buf.copy_rows_(src, 50)
    out = gpu_sampling.sample(logits, buf, vocab=50).tolist()
    assert out[:2] == _cpu(logits[:2], params, [1, 2], [0, 0])
    assert out[2:] == logits[2:].argmax(-1).tolist()


def test_noise_is_exponential_and_hash_is_a_bijection_sample():
    x = torch.arange(1 << 16, dtype=torch.int64)
    assert hash32(x).unique().numel() == x.numel()  # injective on a sample
    assert int(hash32(torch.tensor([0xFFFFFFFF])).item()) < 2**32
    lo = torch.arange(64, dtype=torch.int64)
    noise = race_log_noise(lo, lo * 7 + 1, 2000)  # log E
    e = noise.double().exp()
    assert torch.isfinite(noise).all()
    assert abs(e.mean().item() - 1.0) < 0.01 and abs(e.var().item() - 1.0) < 0.03
