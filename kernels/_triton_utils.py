"""Small shared helpers for the Triton kernels."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so tests exercise the segment-parallel path at small sizes


def triton_available(device: torch.device) -> bool:
    """True when Triton kernels can run for tensors on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or INTERPRET


def patch_interpreter_bf16() -> None:
    """Make Triton's interpreter treat bf16 as the GPU does (idempotent):

    * ``tl.dot`` multiplies bf16 operands as raw uint16 (silently wrong): upcast them first;
    * float32 -> bf16 casts (``.to``, and the implicit one of ``tl.store`` into a bf16 tensor) truncate the
      mantissa (its "rtne" rounds half up and can carry into the exponent wrongly): round to nearest even,
      as the GPU's conversion does, through torch.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_pdelta_patched", False):
        return
    original_dot, original_cast, original_fp_to_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def create_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = self.cast_impl(b, tl.float32)
        return original_dot(self, a, b, d, *args, **kwargs)

    def to_bf16_nearest_even(src):
        data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
        return interpreter.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16_nearest_even(src)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return to_bf16_nearest_even(src)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    create_dot._pdelta_patched = True
    builder.create_dot, builder.cast_impl, builder.create_fp_to_fp = create_dot, cast_impl, create_fp_to_fp


def chunk_tile_config(K: int, V: int) -> tuple[int, int, int, int]:
    """(BK, BV, num_warps, num_stages) of the per-chunk kernels: the whole key dim per program, V in tiles.

    One pipeline stage: the kernels hold several [64, K] fp32 tiles, and more stages overflow Hopper's
    227 KB of shared memory at K = 128 (seen on H200, Triton 3.6.0).
    """
    BK = max(16, next_pow2(K))
    BV = min(64 if BK <= 64 else 32, max(16, next_pow2(V)))
    return BK, BV, 4 if BK <= 64 else 8, 1


# Values each tuning switch accepts: PDELTA_WARPS_<KERNEL> (num_warps) and PDELTA_STAGES_<KERNEL> (num_stages).
SWITCH_CHOICES = {"WARPS": ("1", "2", "4", "8", "16"), "STAGES": ("1", "2", "3", "4")}
# The kernel families with tuning switches, by the variant that launches them (PDN as PGDN).
WARPS_SWITCHES = {
    "pgdn": ("wy_fwd", "wy_bwd", "output_fwd", "output_bwd_state", "output_bwd_qp",
             "state_fwd", "state_bwd", "state_grads"),
    "pkda": ("wy_channel_fwd", "wy_channel_bwd_dl", "wy_channel_bwd", "output_channel_fwd", "output_channel_bwd_state",
             "output_channel_bwd_qp", "state_fwd", "state_bwd", "state_grads"),
}


def _switch(kind: str, kernel: str, default: int) -> int:
    var = f"PDELTA_{kind}_{kernel.upper()}"
    value = os.environ.get(var)
    if value is None:
        return default
    choices = SWITCH_CHOICES[kind]
    if value not in choices:
        raise ValueError(f"{var} must be one of {', '.join(choices)}, got {value!r}; unset it for the default")
    return int(value)


def launch_config(kernel: str, warps: int, stages: int) -> dict[str, int]:
    """num_warps and num_stages for one kernel family's launch: the defaults given, unless PDELTA_WARPS_<KERNEL> or
    PDELTA_STAGES_<KERNEL> (e.g. PDELTA_WARPS_WY_BWD=4) override them — tuning switches for GPU A/B runs
    (benchmarks/warps_sweep.py), read at every launch."""
    return {"num_warps": _switch("WARPS", kernel, warps), "num_stages": _switch("STAGES", kernel, stages)}


def dot_precision() -> str:
    """TF32 products on the GPU (like fla); exact fp32 in the interpreter, where it costs nothing."""
    return "ieee" if INTERPRET else "tf32"


def exact_in_bf16(*tensors: torch.Tensor) -> bool:
    """True when every operand is stored in bfloat16: their product is then exact with bfloat16 operands (float32
    accumulation), as it is at TF32 — bfloat16 only costs less (and fewer registers)."""
    return all(t.dtype == torch.bfloat16 for t in tensors)


_warned: set[str] = set()


def warn_fallback(name: str, exc: Exception) -> None:
    """Warn once per kernel that it did not fit this GPU and its stage runs in PyTorch."""
    if name in _warned:
        return
    _warned.add(name)
    import warnings

    warnings.warn(f"pdelta_cp: Triton kernel {name} does not fit this GPU ({exc}); using the PyTorch form "
                  f"of that stage instead (correct, slower)", RuntimeWarning, stacklevel=4)


def launch_or_fallback(name: str, launch) -> bool:
    """Run ``launch()``; on a Triton OutOfResources (a config too big for this GPU) warn once and return False.

    The caller then computes the stage with its PyTorch form: slower, never wrong.
    """
    from triton.runtime.errors import OutOfResources

    try:
        launch()
        return True
    except OutOfResources as exc:
        warn_fallback(name, exc)
        return False
