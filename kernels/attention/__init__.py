"""Attention backends behind one interface (`plan` per step, `run` per layer)."""
from __future__ import annotations

BACKENDS = ("torch", "flashinfer", "triton")


def get_attention_backend(name: str, model_config, device):
    """The backend named by --attention-backend; a clear error for one this machine cannot run."""
    if name == "torch":
        from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name in ("flashinfer", "triton"):
        raise ValueError(f"--attention-backend {name}: not available in this build yet; use 'torch'")
    raise ValueError(f"--attention-backend must be one of {', '.join(BACKENDS)}, got {name!r}")
