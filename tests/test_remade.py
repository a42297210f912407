"""kernels/remade.py: forward tensors that backward remakes from their recipes instead of keeping them."""
import pytest
import torch

pytest.importorskip("triton")

from pdelta_cp.kernels import remade  # noqa: E402
from pdelta_cp.testing import call, make_inputs  # noqa: E402
from pdelta_cp.ops import precond_delta_rule  # noqa: E402


class _Scale(torch.autograd.Function):
    """y = t · w; saves t through remade.save (``share`` from the caller), reads it back in backward."""

    @staticmethod
    def forward(ctx, t, w, share):
        remade.save(ctx, t, w, share=share)
        return t * w

    @staticmethod
    def backward(ctx, dy):
        t, w = remade.load(ctx)[1]
        return dy * w, (dy * t).sum(), None


def _recipe(calls: list):
    def double(x):
        calls.append(1)
        return x * 2

    return double


def test_a_registered_tensor_is_saved_as_its_inputs_and_remade_bitwise():
    calls = []
    x = torch.randn(5, requires_grad=True)
    t = remade.register(x.detach() * 2, _recipe(calls), x.detach())
    w = torch.tensor(3.0, requires_grad=True)
    y = _Scale.apply(t, w, False)
    saved = y.grad_fn.saved_tensors
    assert not any(s is t or s.data_ptr() == t.data_ptr() for s in saved), "t itself kept"
    y.sum().backward()
    assert len(calls) == 1 and torch.equal(w.grad, t.sum())


def test_sharing_readers_remake_once_and_drop_the_copy_after_the_last():
    calls = []
    x = torch.randn(4)
    t = remade.register(x * 2, _recipe(calls), x)
    w1, w2 = torch.tensor(1.5, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    loss = _Scale.apply(t, w1, True).sum() + _Scale.apply(t, w2, True).sum()
    recipe = remade._RECIPES[t][0]
    loss.backward()
    assert len(calls) == 1, "sharing readers remade it more than once"
    assert recipe.out is None and recipe.unread == recipe.readers == 2
    assert torch.equal(w1.grad, (x * 2).sum()) and torch.equal(w2.grad, (x * 2).sum())


def test_private_readers_remake_for_themselves():
    calls = []
    x = torch.randn(4)
    t = remade.register(x * 2, _recipe(calls), x)
    w1, w2 = torch.tensor(1.5, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    (_Scale.apply(t, w1, False).sum() + _Scale.apply(t, w2, False).sum()).backward()
    assert len(calls) == 2


def test_nested_recipes_save_only_the_innermost_inputs_and_lazy_parts_stay_unmade():
    calls = []
    x = torch.randn(6)
    inner = remade.register(x * 2, _recipe(calls), x)
    outer = remade.register(inner * 2, _recipe(calls), inner)

    class Lazy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            remade.save(ctx, a, b)
            return a + b

        @staticmethod
        def backward(ctx, dy):
            first, rest = remade.load(ctx, lazy=1)
            assert len(calls) == 0, "the lazy part was made before it was asked for"
            assert torch.equal(first()[0], x * 4) and len(calls) == 2  # inner, then outer
            return dy, dy

    b = torch.randn(6, requires_grad=True)
    y = Lazy.apply(outer, b)
    assert [s.data_ptr() for s in y.grad_fn.saved_tensors] == [x.data_ptr(), b.data_ptr()]
    y.sum().backward()


def test_keep_keys_switch_registers_nothing(monkeypatch):
    monkeypatch.setenv("PDELTA_KEEP_KEYS", "1")
    t = remade.register(torch.randn(3), _recipe([]), torch.randn(3))
    assert t not in remade._RECIPES


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_op_gradients_are_bitwise_those_of_kept_keys(variant, monkeypatch):
    """The op with q̂, k̂ and P remade in backward gives exactly the gradients it gives keeping them (the remakes
    run the forward's kernels on the forward's inputs), and keeps fewer bytes from forward to backward."""
    inp = make_inputs(T=150, H=2, HV=4, K=16, V=24, variant=variant, dtype=torch.float32)

    def run():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o, S, A = call(precond_delta_rule, inp, backend="triton", output_final_state=True)
        loss = (o * o).sum() + S.sum() + A.sum()
        return torch.autograd.grad(loss, list(inp.values())), sum(saved.values())

    grads, remade_bytes = run()
    monkeypatch.setenv("PDELTA_KEEP_KEYS", "1")
    kept_grads, kept_bytes = run()
    for name, a, b in zip(inp, grads, kept_grads):
        assert torch.equal(a, b), name
    Nc = 3  # 150 tokens in chunks of 64
    assert kept_bytes - remade_bytes >= 3 * Nc * 2 * 64 * 16 * 4, "q̂, k̂ and P [Nc, H, C, K] float32 still kept"


def _outputs_and_grads(inp, **kw):
    o, S, A = call(precond_delta_rule, inp, backend="triton", output_final_state=True, **kw)
    loss = (o.float() * torch.linspace(-1, 1, o.shape[-1])).sum() + S.sum() + A.sum()
    return (o, S, A), torch.autograd.grad(loss, list(inp.values()))


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
def test_wy_remade_in_bf16_leaves_outputs_and_keeps_gradients_within_the_gpu_limits(variant, monkeypatch):
    """PDELTA_REMAKE_WY_BF16=1 (bf16 inputs): backward reads W, U, P̃ rounded to bfloat16; the forward, and so every
    output, is unchanged bitwise, and every gradient stays within tests/test_gpu.py's limits of float64."""
    from pdelta_cp.testing import rel_rms

    inp = make_inputs(T=200, H=2, HV=4, K=32, V=48, variant=variant, dtype=torch.bfloat16, decay_strength=0.05)
    ref = {n: t.detach().double().requires_grad_(True) for n, t in inp.items()}
    o_ref = call(precond_delta_rule, ref, backend="torch", output_final_state=True)
    loss = (o_ref[0] * torch.linspace(-1, 1, o_ref[0].shape[-1], dtype=torch.float64)).sum() + o_ref[1].sum() \
        + o_ref[2].sum()
    g_ref = torch.autograd.grad(loss, list(ref.values()))
    monkeypatch.setenv("PDELTA_REMAKE_WY_BF16", "0")
    outs, grads = _outputs_and_grads(inp)
    monkeypatch.setenv("PDELTA_REMAKE_WY_BF16", "1")
    outs_bf16, grads_bf16 = _outputs_and_grads(inp)
    for a, b in zip(outs, outs_bf16):
        assert torch.equal(a, b)
    limits = {"q": 8e-3, "k": 8e-3, "v": 8e-3, "initial_state": 8e-3, "initial_A_state": 8e-3}
    moved = False
    for name, a, b, r in zip(inp, grads, grads_bf16, g_ref):
        assert rel_rms(b, r) < limits.get(name, 2e-2), name
        moved |= not torch.equal(a, b)
    assert moved, "no gradient changed: W, U, P̃ were not remade in bfloat16"


def test_wy_remade_in_bf16_only_for_16bit_inputs_and_kept_states():
    from pdelta_cp.kernels.stages import remade_wy_dtype

    assert remade_wy_dtype(torch.bfloat16, states_remade=False) == torch.bfloat16  # the default (session o)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDELTA_REMAKE_WY_BF16", "0")
        assert remade_wy_dtype(torch.bfloat16, states_remade=False) == torch.float32
        mp.setenv("PDELTA_REMAKE_WY_BF16", "1")
        assert remade_wy_dtype(torch.bfloat16, states_remade=False) == torch.bfloat16
        assert remade_wy_dtype(torch.float16, states_remade=False) == torch.bfloat16
        assert remade_wy_dtype(torch.float32, states_remade=False) == torch.float32
        assert remade_wy_dtype(torch.bfloat16, states_remade=True) == torch.float32  # S remade from them: no


def test_recipes_die_with_their_tensors():
    """The registry holds a recipe only while its tensor lives: q̂, k̂ and P die with the forward (the stages saved
    their inputs), so nothing is left after it, nor after backward — a leak would keep every layer's q, k and
    preconditioner inputs alive."""
    import gc

    inp = make_inputs(T=70, H=1, K=16, V=16, variant="pgdn", dtype=torch.float32)
    gc.collect()
    before = len(remade._RECIPES)
    o, S, A = call(precond_delta_rule, inp, backend="triton", output_final_state=True)
    gc.collect()
    assert len(remade._RECIPES) <= before  # (<=: another test's leftovers may die meanwhile)
    (o.sum() + S.sum() + A.sum()).backward()
    del o, S, A
    gc.collect()
    assert len(remade._RECIPES) <= before and all(t.grad is not None for t in inp.values())
