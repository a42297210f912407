"""Catch a data layout that does not match the mixer's: scrambled tokens must fail loudly, never silently.

Megatron's data helpers split each batch for context parallelism (``get_batch_on_this_cp_rank``: zigzag per
sample; ``get_thd_batch_on_this_cp_rank``: zigzag per packed sequence). A custom loader may split
differently (e.g. contiguously). :func:`apply_patches` wraps the two helpers so that they record the layout
they produced; a loader of your own declares its layout with :func:`declare_batch_layout`. The mixer
compares the recorded layout with its own on every call and raises on a mismatch.

Patch targets: ``megatron.core.utils.get_batch_on_this_cp_rank`` (megatron-core 0.14+) and
``megatron.core.utils.get_thd_batch_on_this_cp_rank`` (0.16+). Explicit, idempotent, version-checked;
nothing is patched at import.
"""
from __future__ import annotations

import contextvars
import functools
import warnings

_batch_layout: contextvars.ContextVar[str | None] = contextvars.ContextVar("pdelta_cp_batch_layout", default=None)
SUPPORTED = ((0, 14), (0, 20))  # [first, last) megatron-core minor versions the patch targets were read from


def declare_batch_layout(layout: str | None) -> None:
    """Record how the current batch was split over CP ranks (None: unknown, no check)."""
    _batch_layout.set(layout)


def current_batch_layout() -> str | None:
    return _batch_layout.get()


def check_layout(expected: str, cp_size: int) -> None:
    """Raise if the recorded batch layout differs from ``expected`` (only meaningful when cp_size > 1)."""
    declared = _batch_layout.get()
    if cp_size > 1 and declared is not None and declared != expected:
        raise ValueError(f"the batch was split over the context-parallel ranks with layout {declared!r}, but the "
                         f"mixer reads its tokens as {expected!r}: the sequence would be scrambled. Build the "
                         f"mixer with cp_layout={declared!r} or split the batch with the matching helper.")


def _version() -> tuple[int, int]:
    import megatron.core

    major, minor = megatron.core.__version__.split(".")[:2]
    return int(major), int(minor)


def apply_patches() -> list[str]:
    """Wrap Megatron's CP batch helpers so that they record their layout. Returns the patched names."""
    import megatron.core.utils as mutils

    version = _version()
    if not (SUPPORTED[0] <= version < SUPPORTED[1]):
        warnings.warn(f"pdelta_cp.megatron_patches targets megatron-core {SUPPORTED[0]}..{SUPPORTED[1]} (exclusive); "
                      f"found {version}: layout checks may miss a helper", RuntimeWarning, stacklevel=2)
    patched = []
    for name, layout in (("get_batch_on_this_cp_rank", "zigzag"),
                         ("get_thd_batch_on_this_cp_rank", "zigzag_per_sequence")):
        original = getattr(mutils, name, None)
        if original is None or getattr(original, "_pdelta_layout", None):
            continue

        def wrapper(*args, _original=original, _layout=layout, **kwargs):
            declare_batch_layout(_layout)
            return _original(*args, **kwargs)

        functools.update_wrapper(wrapper, original)
        wrapper._pdelta_layout = layout
        setattr(mutils, name, wrapper)
        patched.append(name)
    return patched
