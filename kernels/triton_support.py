"""Triton, imported once for every kernel module (attention, fused layer ops), with the interpreter fix.

Triton is optional: HAS_TRITON says whether it imported (triton/tl are None otherwise). Its kernels run
on a CUDA GPU, and on CPU tensors under Triton's interpreter when TRITON_INTERPRET=1 is in the
environment before triton is imported (the @triton.jit decorator reads it): that is how CI checks the
kernels against their torch references.
"""
from __future__ import annotations

import os


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter holds a scalar as a 1-element array and turns it into a Python
    int with int(array), which NumPy >= 2.4 rejects for arrays of ndim 1: every range() over a
    loaded bound then fails. Re-register __index__ to read the single element (later Triton
    releases do the same). Only the interpreter is touched; compiled GPU kernels are not."""
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover
        return
    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_duet_scalar_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._duet_scalar_fix = True
    interp._patch_lang_tensor = patched


def _fix_interpreter_bf16_rounding() -> None:
    """Triton 3.6's interpreter casts float32 to bfloat16 by dropping the low 16 bits (`.to()`), or by
    rounding half up without ties-to-even or the carry into the exponent (explicit "rtne"), while the
    compiled kernels round to nearest even, as torch does. Kernels that mirror torch's bf16 rounding
    step for step could then not be checked exactly on a CPU: make the interpreter round to nearest even
    (round toward zero stays what "rtz" asks for). Compiled GPU kernels are not touched."""
    try:
        import numpy as np
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover
        return
    original = getattr(interp, "_convert_float", None)
    if original is None or getattr(original, "_duet_rne_fix", False):
        return
    rtz = interp._ir.ROUNDING_MODE.RTZ

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype != tl.float32 or output_dtype != tl.bfloat16 or rounding_mode == rtz:
            return original(input, input_dtype, output_dtype, rounding_mode)
        u = np.frombuffer(np.ascontiguousarray(input, dtype=np.float32).tobytes(), dtype=np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        out = np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)  # NaN stays a (quiet) NaN
        return out.reshape(np.shape(input))

    convert._duet_rne_fix = True
    interp._convert_float = convert


try:  # triton is optional: callers turn its absence into a clear error or a torch fallback
    import triton
    import triton.language as tl

    HAS_TRITON = True
    if interpreter_enabled():
        _fix_interpreter_scalar_index()
        _fix_interpreter_bf16_rounding()
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None
    HAS_TRITON = False


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())
