"""Device-independent cost counters of the op's fwd+bwd: PyTorch ops launched and the bytes they move (the glue
around the kernels, by site), bytes saved for backward, and the peak of live tensor bytes (beyond the inputs) over
forward + backward.

Runs anywhere (CPU: Triton kernels under TRITON_INTERPRET=1), so glue and memory work can be measured between
GPU sessions. Triton kernel launches are not aten ops and are not counted; everything around them is.

    TRITON_INTERPRET=1 python benchmarks/graph_stats.py --variant pgdn --T 2048
    TRITON_INTERPRET=1 python benchmarks/graph_stats.py --variant pgdn --K 128 --V 128 --settings "" PDELTA_KEEP_KEYS=1

``alive_at_peak`` lists what was alive at the peak (bytes per token, op, shape, dtype, phase, the line that made
it): the map for memory work. Per-token bytes scale with H (and with K·V for per-chunk states), so small H and
T on a CPU give the layout of an H100's peak.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pdelta_cp import precond_delta_rule  # noqa: E402
from pdelta_cp.testing import call, make_inputs  # noqa: E402

_VIEWS = {"view", "_unsafe_view", "reshape", "expand", "slice", "select", "permute", "transpose", "t",
          "unsqueeze", "squeeze", "as_strided", "alias", "detach", "movedim", "split", "unbind", "narrow",
          "empty", "empty_like", "new_empty", "empty_strided", "_to_copy_noop"}


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(y) for y in x)
    return 0


class _CountOps(TorchDispatchMode):
    """Counts aten ops that launch work (views and allocations excluded), and the bytes they move (inputs read
    plus outputs written: the glue traffic around the kernels) by op and site — the repository line, or for the
    autograd engine the node it ran for (e.g. a cast of a returned gradient, or the sum of two gradients)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.traffic = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            return out
        self.counts[name] += 1
        site = _made_at()
        if site == "autograd":
            node = torch._C._current_autograd_node()
            site = f"autograd {node.name() if node is not None else ''}".rstrip()
        moved = _tensor_bytes(out)
        if not name.startswith(("new_", "zeros", "ones", "full")):  # a fill only writes
            # what it reads: every tensor argument but the one it writes in place (copy_'s destination)
            moved += _tensor_bytes([a for a in (*args, *(kwargs or {}).values()) if a is not out])
        self.traffic[f"{name} at {site}"] += moved
        return out


class _LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive; remembers the peak and, at the peak,
    what was alive: (bytes, description) per storage, the description naming the op, shape, dtype, the phase
    (``self.phase``: set it to "bwd" before backward) and the repository line that made it.

    A storage is alive while any tensor made here refers to it (views included); Triton interpreter temporaries
    are hidden by :func:`_uncounted_kernel_launches`, so on CPU this is the GPU allocator's view of the op.
    """

    def __init__(self, exclude: set[int] = frozenset()):
        """``exclude``: data pointers of storages not to count (the caller's inputs: views of them made inside
        the mode are no new memory)."""
        super().__init__()
        self.exclude = exclude
        self.refs, self.made = collections.Counter(), {}
        self.current = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []
        self.phase = "fwd"

    def _drop(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            self.current -= self.made.pop(ptr)[0]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not t.untyped_storage().data_ptr():
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.exclude:
                continue
            if ptr not in self.made:
                what = f"{self.phase} {func.overloadpacket.__name__} {tuple(t.shape)} {t.dtype} at {_made_at()}"
                self.made[ptr] = (t.untyped_storage().nbytes(), what)
                self.current += self.made[ptr][0]
                if self.current > self.peak:
                    self.peak, self.at_peak = self.current, list(self.made.values())
            self.refs[ptr] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE_DIRS = tuple(os.path.join(_REPO, d) + os.sep for d in ("pdelta_cp", "kernels", "megatron_patches"))


_ALLOCATION_HELPERS = {"grad_buffer"}  # named by their caller's line: the helper's own line says nothing


def _made_at() -> str:
    """The innermost line of this repository's package code on the stack (``autograd`` when none: the engine)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.realpath(frame.filename)
        if path.startswith(_PACKAGE_DIRS) and frame.name not in _ALLOCATION_HELPERS:
            return f"{os.path.relpath(path, _REPO)}:{frame.lineno}"
    return "autograd"


def _uncounted_kernel_launches() -> collections.Counter:
    """Interpreter launches move tensors with aten ops of their own: hide them, count launches instead."""
    launches = collections.Counter()
    if os.environ.get("TRITON_INTERPRET") != "1":
        return launches  # compiled kernels issue no aten ops
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    if getattr(original, "_pdelta_counting", False):
        return original._pdelta_launches

    def run(self, *args, **kwargs):
        launches[getattr(self.fn, "__name__", "kernel")] += 1
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    run._pdelta_counting, run._pdelta_launches = True, launches
    InterpretedFunction.run = run
    return launches


def graph_stats(variant: str, T: int, H: int, K: int, V: int, dtype, backend: str, device: str) -> dict:
    inp = make_inputs(B=1, T=T, H=H, K=K, V=V, variant=variant, dtype=dtype, device=device)
    saved: dict[int, int] = {}

    inputs = {t.untyped_storage().data_ptr() for t in inp.values() if isinstance(t, torch.Tensor)}

    def pack(t):  # what backward keeps beyond the inputs (an input saved for backward costs nothing more)
        if t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    call(precond_delta_rule, inp, backend=backend)  # warm-up: cached plans and index tensors, as in training
    launches = _uncounted_kernel_launches()
    launches.clear()
    fwd, bwd, live = _CountOps(), _CountOps(), _LiveBytes(exclude=inputs)
    with live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fwd:
            o = call(precond_delta_rule, inp, backend=backend)[0]
        fwd_launches = sum(launches.values())
        do = torch.randn_like(o)  # a fixed output gradient: no loss ops in the backward's counts
        live.phase = "bwd"
        with bwd:
            o.backward(do)
    input_bytes = sum(t.untyped_storage().nbytes() for t in inp.values() if isinstance(t, torch.Tensor))
    saved_bytes = sum(saved.values())
    return {"variant": variant, "T": T, "H": H, "K": K, "V": V, "dtype": str(dtype), "backend": backend,
            "fwd_ops": sum(fwd.counts.values()), "bwd_ops": sum(bwd.counts.values()),
            "fwd_kernels": fwd_launches, "bwd_kernels": sum(launches.values()) - fwd_launches,
            "saved_bytes_per_token": saved_bytes / T, "saved_over_inputs": saved_bytes / input_bytes,
            "peak_bytes_per_token": live.peak / T,
            "alive_at_peak": [f"{n / T:.0f} B/token: {what}" for n, what in sorted(live.at_peak, reverse=True)
                              if n >= live.peak / 200],  # the storages of at least 0.5% of the peak
            "top_fwd": fwd.counts.most_common(12), "top_bwd": bwd.counts.most_common(12),
            "glue_bytes_per_token": (sum(fwd.traffic.values()) + sum(bwd.traffic.values())) / T,
            "glue_traffic": [f"{n / T:.0f} B/token: {phase} {what}" for phase, counter in (("fwd", fwd), ("bwd", bwd))
                             for what, n in counter.traffic.most_common() if n >= T]}  # sites of at least 1 B/token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", nargs="+", default=["pgdn", "pkda"])
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--settings", nargs="*", default=[""],
                    help="VAR=VALUE[,VAR=VALUE] environment settings to compare, one row each ('' = as it is), "
                         "e.g. PDELTA_KEEP_KEYS=1 PDELTA_REMAKE_WY_BF16=1,PDELTA_ADJOINTS_BF16=1")
    args = ap.parse_args()
    for setting in args.settings:
        env = dict(kv.split("=", 1) for kv in setting.split(",") if kv)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for variant in args.variant:
                row = graph_stats(variant, args.T, args.H, args.K, args.V, getattr(torch, args.dtype), args.backend,
                                  args.device)
                print(json.dumps({"settings": env, **row}), flush=True)
        finally:
            for k, v in saved.items():  # as before this setting
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    main()
