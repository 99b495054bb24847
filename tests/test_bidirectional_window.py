"""The hand-written backward of bidirectional FAVOR with the exact local window (ops/bidirectional_window.py)
against autograd through the O(L^2) reference (ops/naive.py): outputs and gradients dq, dk, dv for both positive
kernels, calibrated feature maps (query/key scales, key shift, favor++'s A), padding of every kind, windows
narrower and wider than a block, one pass and CPU segments; padded keys get exactly 0; float64 gradcheck."""

import pytest
import torch

import hf_performer.ops.bidirectional as bidirectional
from hf_performer import PerformerConfig
from hf_performer.attention import FavorAttention
from hf_performer.features import FeatureMap, draw_projection
from hf_performer.ops import favor_bidirectional, naive_linear_attention
from hf_performer.ops.bidirectional_window import PositiveWindow

D64 = torch.float64


def qkv(B=3, H=2, L=41, d=8, dv=5, scale=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(B, H, L, d, generator=g, dtype=D64) for _ in range(2)] + [
        torch.randn(B, H, L, dv, generator=g, dtype=D64)]


def masks(B, L):
    m = torch.ones(B, L, dtype=torch.bool)
    m[0, :5] = False  # left padding
    m[1, L - 7 :] = False  # right padding
    m[2, 10:13] = False  # inside the sequence
    return m


def fmap_of(kernel, window, q, k, mask):
    """A calibrated layer's feature map (scales, key shift, favor++'s A: data-dependent constants)."""
    cfg = PerformerConfig(nb_features=32, kernel=kernel, local_window=window, seed=5)
    att = FavorAttention(q.shape[-1], cfg, num_heads=q.shape[1]).to(D64)
    att.calibrate_statistics(q, k, mask)
    return att._prepare(q, k, False, mask, None)


def grads(fn, q, k, v, g):
    x = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*x)
    return out, torch.autograd.grad((out * g).sum(), x)


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
@pytest.mark.parametrize("window", [1, 4, 9])
@pytest.mark.parametrize("seg", [None, 7, 16])
def test_outputs_and_gradients_equal_autograd_through_the_reference(kernel, window, seg, monkeypatch):
    monkeypatch.setattr(bidirectional, "cpu_segment", lambda *a, **kw: seg)  # one pass, or segments of seg
    q, k, v = qkv()
    mask = masks(3, 41)
    fmap = fmap_of(kernel, window, q, k, mask)
    g = torch.randn(3, 2, 41, 5, generator=torch.Generator().manual_seed(1), dtype=D64)
    out, fast = grads(lambda q, k, v: favor_bidirectional(q, k, v, fmap, mask, window), q, k, v, g)
    ref, slow = grads(lambda q, k, v: naive_linear_attention(q, k, v, fmap, False, mask, window), q, k, v, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip("qkv", fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"d{name}")
    for name, grad in (("k", fast[1]), ("v", fast[2])):  # padded keys: exactly 0, not merely small
        assert (grad.transpose(1, 2)[~mask] == 0).all(), name
    # the window path ran (not the autograd one): its backward node
    assert type(favor_bidirectional(*(t.requires_grad_(True) for t in qkv()), fmap, mask, window).grad_fn).__name__ \
        == "PositiveWindowBackward"


def test_a_row_without_any_real_key_gets_zero_output_and_gradient():
    q, k, v = qkv(B=2, L=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    fmap = FeatureMap("softmax", draw_projection(16, 8, seed=2))
    out, (dq, dk, dv) = grads(lambda q, k, v: favor_bidirectional(q, k, v, fmap, mask, 3), q, k, v, torch.ones(2, 2, 20, 5))
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert torch.isfinite(out).all() and (out[0] != 0).any()


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
@pytest.mark.parametrize("seg", [None, 4])
def test_gradcheck(kernel, seg):
    q, k, v = (t.requires_grad_(True) for t in qkv(B=2, H=1, L=11, d=3, dv=2))
    a = torch.full((1, 1, 1, 1), 0.05, dtype=D64) if kernel == "favor++" else None
    fmap = FeatureMap(kernel, draw_projection(6, 3, seed=1), a=a)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 9:] = False
    mask[1, :2] = False
    assert torch.autograd.gradcheck(lambda q, k, v: PositiveWindow.apply(q, k, v, fmap, mask, 2, seg), (q, k, v))
