"""Attention backends behind one interface (`plan` per step, `run` per layer).

  torch       reference in plain PyTorch (CPU or GPU): the oracle in tests
  flashinfer  GPU fast path (FlashInfer 0.6.x paged prefill/decode wrappers, CUDA-graph decode)
  triton      Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1, for tests)
  auto        flashinfer on a GPU when importable, else triton, else torch; torch on a CPU
"""
from __future__ import annotations

import torch

BACKENDS = ("torch", "flashinfer", "triton", "auto")


def resolve_backend_name(name: str, device) -> str:
    """'auto' -> the best backend this machine can run on `device`; other names unchanged."""
    if name != "auto":
        return name
    if torch.device(device).type != "cuda":
        return "torch"
    try:
        import flashinfer  # noqa: F401

        return "flashinfer"
    except ImportError:
        pass
    from sglang_duet.kernels.attention.triton_backend import HAS_TRITON

    return "triton" if HAS_TRITON else "torch"


def get_attention_backend(name: str, model_config, device):
    """The backend named by --attention-backend; a clear error for one this machine cannot run."""
    name = resolve_backend_name(name, device)
    if name == "torch":
        from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from sglang_duet.kernels.attention.triton_backend import TritonAttentionBackend, check_available

        check_available(torch.device(device))
        return TritonAttentionBackend(model_config.num_key_value_heads)
    if name == "flashinfer":
        from sglang_duet.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(model_config.num_attention_heads, model_config.num_key_value_heads,
                                          model_config.head_dim, device)
    raise ValueError(f"--attention-backend must be one of {', '.join(BACKENDS)}, got {name!r}")
