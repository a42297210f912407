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


def _block(variant, tp, cp):
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    enable_cpu()
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=2, hidden_size=D, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float32, tensor_model_parallel_size=tp,
                               context_parallel_size=cp, hidden_dropout=0.0, attention_dropout=0.0,
                               normalization="RMSNorm", bias_dropout_fusion=False, add_bias_linear=False,
                               gradient_accumulation_fusion=False)
    return TransformerBlock(config, spec=pdelta_block_spec(2, variant), post_process=False)


def _run(block, x, w):
    out = block(x, attention_mask=None)
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
    cp_group, cp_rank = parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    out, grads = _run(block, shard(x, cp, cp_rank, "zigzag", dim=0), shard(w, cp, cp_rank, "zigzag", dim=0))
    errors = {"out": rel_rms(out, shard(ref_out, cp, cp_rank, "zigzag", dim=0))}
    for name, p in block.named_parameters():
        g = grads[name].clone()
        dist.all_reduce(g, group=cp_group)  # each CP rank holds its own contribution
        ref = ref_grads[name]
        if getattr(p, "tensor_model_parallel", False):
            n = p.shape[p.partition_dim]
            ref = ref.narrow(p.partition_dim, tp_rank * n, n)
        errors[name] = rel_rms(g, ref)
    parallel_state.destroy_model_parallel()
    bad = {k: e for k, e in errors.items() if not e < 1e-5}
    assert not bad, bad
