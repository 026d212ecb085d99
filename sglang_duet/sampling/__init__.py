"""Token sampling: logits processing (penalties, min_new_tokens, temperature, top-k/p, min-p) and drawing."""
from sglang_duet.sampling.sampler import SampleOutput, Sampler, SamplingRow, step_seed

__all__ = ["SampleOutput", "Sampler", "SamplingRow", "step_seed"]
