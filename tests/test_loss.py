"""The chunked language-model loss equals the whole-sequence loss, with and without gradients."""
import pytest
import torch
import torch.nn.functional as F

from pdelta_cp.train.loss import lm_loss_sums


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 1000])
def test_chunked_loss_equals_the_plain_loss_and_gradients(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (50,), generator=gen)
    labels[::5] = -100
    logits = F.linear(hidden, weight)
    want = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    want_grads = torch.autograd.grad(want, [hidden, weight])
    loss, count, correct = lm_loss_sums(hidden, weight, labels, ignore_index=-100, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss, [hidden, weight])
    mask = labels != -100
    assert torch.allclose(loss.double(), want, rtol=1e-6)
    assert count.item() == mask.sum().item()
    assert correct.item() == (logits.argmax(-1)[mask] == labels[mask]).sum().item()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, want_grads))


def test_chunked_loss_frees_logits_between_chunks():
    """With chunks, autograd keeps no [N, vocab] tensor: saved tensors stay far below one full logits matrix."""
    hidden = torch.randn(512, 8, requires_grad=True)
    weight = torch.randn(2048, 8, requires_grad=True)
    labels = torch.randint(0, 2048, (512,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        lm_loss_sums(hidden, weight, labels, ignore_index=-100, chunk_tokens=64)
    assert max(saved) < 512 * 2048 // 4


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_tokens"):
        lm_loss_sums(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), ignore_index=-100,
                     chunk_tokens=-1)


def test_bf16_residual_stream_halves_what_recompute_keeps():
    """fp32_residual=False under bf16 autocast: blocks receive bf16 (what per-block recompute stores), the
    output stays finite; with the default the residual stream is float32."""
    from pdelta_cp.model import LanguageModel, ModelConfig

    seen = {}
    for fp32 in (True, False):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=2, head_dim=16,
                                          fp32_residual=fp32, recompute=True))
        model.blocks[1].register_forward_pre_hook(lambda m, args, fp32=fp32: seen.__setitem__(fp32, args[0].dtype))
        tokens = torch.randint(0, 32, (2, 64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(tokens, return_hidden=True)
            loss, _, _ = lm_loss_sums(hidden.reshape(-1, 32), model.embed.weight, tokens.reshape(-1),
                                      ignore_index=-100)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)
    assert seen == {True: torch.float32, False: torch.bfloat16}
