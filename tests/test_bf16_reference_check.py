"""The GPU suite's bf16-vs-float32 check (tests/gpu/gpu_common.first_divergences), run on the CPU: a bf16
run of the small head_dim-128 model leaves its float32 reference only at a near-tie, and a run that takes
a token the reference ranked far lower fails the check (so the GPU test can fail)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu"))
from gpu_common import NEAR_TIE_NATS, first_divergences, greedy_reference, save_small_model  # noqa: E402

from sglang_duet.engine import Engine  # noqa: E402
from sglang_duet.sampling_params import SamplingParams  # noqa: E402

NEW = 16


def test_bf16_leaves_the_reference_only_at_near_ties_and_a_wrong_token_is_caught(tmp_path):
    path = save_small_model(tmp_path)
    prompts, ref = greedy_reference(path, NEW)
    got = [o["output_ids"] for o in Engine(model_path=path, dtype="bfloat16", device="cpu").generate(
        input_ids=prompts, sampling_params=SamplingParams(temperature=0.0, max_new_tokens=NEW, ignore_eos=True))]
    divs = first_divergences(ref, got)
    assert all(gap is not None and gap <= NEAR_TIE_NATS for _, gap in divs), divs
    # the reference's own tokens: nothing to report
    assert first_divergences(ref, [o["output_ids"] for o in ref]) == []
    # a run that takes the reference's 5th choice where its top two are far apart is caught
    lps = ref[0]["meta_info"]["output_token_logprobs"]
    j = max(range(NEW), key=lambda i: lps[i]["top"][0][1] - lps[i]["top"][-1][1])
    wrong = list(ref[0]["output_ids"])
    wrong[j] = lps[j]["top"][-1][0]
    ((where, gap),) = first_divergences(ref[:1], [wrong])
    assert where == j and gap > NEAR_TIE_NATS
    wrong[j] = 1  # not in the reference's top-5 at all
    assert first_divergences(ref[:1], [wrong]) == [(j, None)]
