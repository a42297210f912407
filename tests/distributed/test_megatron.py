"""Megatron-core (CPU, gloo): a block of our mixers under TP x CP gives the TP=1 CP=1 outputs and gradients."""
import pytest
import torch
import torch.distributed as dist

megatron = pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlock  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from pdelta_cp.cp.layout import shard  # noqa: E402
from pdelta_cp.megatron_patches.cpu import enable_cpu  # noqa: E402
from pdelta_cp.megatron_patches.specs import pdelta_block_spec  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

pytestmark = pytest.mark.distributed
S, B, D = 32, 2, 32  # tokens per sample, samples, hidden size


def _config(tp, cp, sp=False, hidden=D, device=torch.device("cpu")):
    """(Re)initialise Megatron's parallel state and return a small float32 config (same seed every time)."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)
    else:
        enable_cpu()
    torch.manual_seed(0)
    return TransformerConfig(num_layers=2, hidden_size=hidden, num_attention_heads=4, use_cpu_initialization=True,
                             params_dtype=torch.float32, tensor_model_parallel_size=tp, context_parallel_size=cp,
                             hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
                             bias_dropout_fusion=False, add_bias_linear=False, gradient_accumulation_fusion=False,
                             sequence_parallel=sp)


def _block(variant, tp, cp):
    return TransformerBlock(_config(tp, cp), spec=pdelta_block_spec(2, variant), post_process=False)


def _compare(block, out, grads, ref_out_local, ref_grads, tol=1e-5):
    """Errors of the local output and of every (CP-summed, TP-sliced) parameter gradient."""
    cp_group = parallel_state.get_context_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    errors = {"out": rel_rms(out, ref_out_local)}
    for name, p in block.named_parameters():
        g = grads[name].clone()
        dist.all_reduce(g, group=cp_group)  # each CP rank holds its own contribution
        ref = ref_grads[name]
        if getattr(p, "tensor_model_parallel", False):
            n = p.shape[p.partition_dim]
            ref = ref.narrow(p.partition_dim, tp_rank * n, n)
        errors[name] = rel_rms(g, ref)
    parallel_state.destroy_model_parallel()
    return {k: e for k, e in errors.items() if not e < tol}


def _run(block, x, w, packed=None):
    out = block(x, attention_mask=None, **({} if packed is None else {"packed_seq_params": packed}))
    grads = torch.autograd.grad((out * w).sum(), [p for _, p in block.named_parameters()])
    return out.detach(), dict(zip([n for n, _ in block.named_parameters()], grads))


@pytest.mark.parametrize("variant", ["pgdn", "pkda"])
@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2)])
def test_megatron_block_tp_cp_matches_single(world, variant, tp, cp):
    if world != tp * cp:
        pytest.skip(f"needs {tp * cp} processes")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(S, B, D, generator=gen)
    w = torch.randn(S, B, D, generator=gen)
    ref_out, ref_grads = _run(_block(variant, 1, 1), x, w)
    block = _block(variant, tp, cp)
    cp_rank = parallel_state.get_context_parallel_rank()
    out, grads = _run(block, shard(x, cp, cp_rank, "zigzag", dim=0), shard(w, cp, cp_rank, "zigzag", dim=0))
    bad = _compare(block, out, grads, shard(ref_out, cp, cp_rank, "zigzag", dim=0), ref_grads)
    assert not bad, bad


@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2)])
def test_megatron_thd_packed_matches_single(world, tp, cp):
    """Packed THD batch (sequences padded to 2*cp, each zigzag-split on its own) through the block."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if world != tp * cp:
        pytest.skip(f"needs {tp * cp} processes")
    cu = [0, 8, 40, 64]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, cu_seqlens_q_padded=cu_t,
                             cu_seqlens_kv_padded=cu_t, max_seqlen_q=32, max_seqlen_kv=32)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, 1, D, generator=gen)
    w = torch.randn(64, 1, D, generator=gen)
    ref_out, ref_grads = _run(_block("pgdn", 1, 1), x, w, packed)
    block = _block("pgdn", tp, cp)
    cp_rank = parallel_state.get_context_parallel_rank()

    def local(t):
        return shard(t, cp, cp_rank, "zigzag_per_sequence", dim=0, cu_seqlens=cu)

    out, grads = _run(block, local(x), local(w), packed)
    bad = _compare(block, out, grads, local(ref_out), ref_grads)
    assert not bad, bad


def test_checkpoint_saved_at_tp2_cp2_loads_at_tp1_cp1(world, tmp_path_factory):
    """Distributed checkpoint (sharded_state_dict) saved under TP=2 x CP=2 restores the exact TP=1 model."""
    from megatron.core import dist_checkpointing

    if world != 4:
        pytest.skip("needs 4 processes")
    folder = tmp_path_factory.getbasetemp() / "megatron_ckpt"  # same path on every rank (shared base temp)
    path = [str(folder)]
    dist.broadcast_object_list(path, src=0)
    block = _block("pkda", 2, 2)
    with torch.no_grad():  # move away from the seeded init so the load must really restore values
        for p in block.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if dist.get_rank() == 0:
        import os
        os.makedirs(path[0], exist_ok=True)
    dist.barrier()
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    dist_checkpointing.save(block.sharded_state_dict(), path[0],
                            sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    saved = {n: p.detach().clone() for n, p in block.named_parameters()}
    shard_info = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0))
                  for n, p in block.named_parameters()}

    fresh = _block("pkda", 1, 1)
    state = dist_checkpointing.load(fresh.sharded_state_dict(), path[0])
    fresh.load_state_dict(state)
    errors = {}
    for name, p in fresh.named_parameters():
        sharded, dim = shard_info[name]
        full = p.detach()
        expect = saved[name]
        got = full.narrow(dim, tp_rank * expect.shape[dim], expect.shape[dim]) if sharded else full
        errors[name] = (got - expect).abs().max().item()
    parallel_state.destroy_model_parallel()
    bad = {k: e for k, e in errors.items() if e > 0}
    assert not bad, bad


@pytest.mark.parametrize("tp,cp,sp", [(1, 2, False), (2, 2, False), (2, 2, True)])
def test_gpt_model_builder_cp_matches_single(world, tp, cp, sp):
    """The model builder's per-token losses and gradients under TP x CP (and sequence parallelism) equal TP=1."""
    from pdelta_cp.megatron_patches.specs import build_gpt_model

    if world != tp * cp:
        pytest.skip(f"needs {tp * cp} processes")

    def model(tp_, cp_, sp_=False):
        return build_gpt_model(_config(tp_, cp_, sp_), vocab_size=64, max_sequence_length=S, variant="pgdn")

    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 64, (B, S), generator=gen)
    labels = torch.randint(0, 64, (B, S), generator=gen)
    ref_model = model(1, 1)
    ref_loss = ref_model(tokens, None, None, labels=labels)
    ref_grads = dict(zip([n for n, _ in ref_model.named_parameters()],
                         torch.autograd.grad(ref_loss.sum(), list(ref_model.parameters()))))
    m = model(tp, cp, sp)
    cp_rank = parallel_state.get_context_parallel_rank()
    loss = m(shard(tokens, cp, cp_rank, "zigzag"), None, None, labels=shard(labels, cp, cp_rank, "zigzag"))
    grads = dict(zip([n for n, _ in m.named_parameters()], torch.autograd.grad(loss.sum(), list(m.parameters()))))
    if sp:  # replicated parameters see only their s/tp tokens: their gradients are summed over TP (as
        for name, p in m.named_parameters():  # Megatron's finalize_model_grads does for sequence_parallel ones)
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(grads[name], group=parallel_state.get_tensor_model_parallel_group())
    bad = _compare(m, loss.detach(), grads, shard(ref_loss.detach(), cp, cp_rank, "zigzag"), ref_grads)
    assert not bad, bad


def test_layout_mismatch_fails_loudly(world):
    """A batch split contiguously fed to a mixer expecting Megatron's zigzag raises on every rank."""
    import megatron.core.utils as mutils

    from pdelta_cp.megatron_patches.layout import apply_patches, declare_batch_layout

    if world != 2:
        pytest.skip("needs 2 processes")
    apply_patches()
    assert apply_patches() == []  # idempotent
    block = _block("pgdn", 1, 2)
    cp_rank = parallel_state.get_context_parallel_rank()
    x = torch.randn(S, B, D, generator=torch.Generator().manual_seed(1))
    import inspect

    needs_flag = "is_hybrid_cp" in inspect.signature(mutils.get_batch_on_this_cp_rank).parameters
    extra = {"is_hybrid_cp": False} if needs_flag else {}  # megatron-core 0.19 added a required argument
    batch = mutils.get_batch_on_this_cp_rank({"tokens": x.transpose(0, 1)}, **extra)  # records "zigzag"
    assert torch.equal(batch["tokens"].transpose(0, 1), shard(x, 2, cp_rank, "zigzag", dim=0))
    block(batch["tokens"].transpose(0, 1).contiguous(), attention_mask=None)  # matching layouts: fine
    declare_batch_layout("contiguous")  # a custom loader that split contiguously
    with pytest.raises(ValueError, match="would be scrambled"):
        block(shard(x, 2, cp_rank, "contiguous", dim=0), attention_mask=None)
    declare_batch_layout(None)
    parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2)])
def test_mamba_stack_slot_matches_single(world, tp, cp):
    """Our mixer as the ``M`` symbol of Megatron's hybrid MambaStack ("M-M-"), under TP x CP."""
    from pdelta_cp.megatron_patches.specs import build_hybrid_stack

    if world != tp * cp:
        pytest.skip(f"needs {tp * cp} processes")

    def stack(tp_, cp_):
        config = _config(tp_, cp_)
        config.num_layers = 4
        return build_hybrid_stack(config, "M-M-", "pgdn", post_layer_norm=False)

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(S, B, D, generator=gen)
    w = torch.randn(S, B, D, generator=gen)
    ref_out, ref_grads = _run(stack(1, 1), x, w)
    block = stack(tp, cp)
    cp_rank = parallel_state.get_context_parallel_rank()
    out, grads = _run(block, shard(x, cp, cp_rank, "zigzag", dim=0), shard(w, cp, cp_rank, "zigzag", dim=0))
    bad = _compare(block, out, grads, shard(ref_out, cp, cp_rank, "zigzag", dim=0), ref_grads)
    assert not bad, bad
