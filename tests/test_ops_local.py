"""Local-window attention (exact softmax on the nearest keys, FAVOR on the rest) against independent references:
the O(L^2) masked reference with the window's pairs exact, exact softmax attention when the window covers every
key, autograd through the reference, and decoding against the full causal pass."""

import pytest
import torch
from test_ops import assert_values_and_gradients

from hf_performer import PerformerConfig
from hf_performer.attention import FavorAttention
from hf_performer.features import FeatureMap, draw_projection
from hf_performer.ops import common as ops_common
from hf_performer.ops import (
    exact_softmax_attention,
    favor_bidirectional,
    favor_causal,
    naive_linear_attention,
)
from hf_performer.ops.local import band, band_apply, flip_band, near, rows, unband

D64 = torch.float64


def qkv(B=2, H=3, L=37, d=8, dv=5, scale=0.6, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=D64).to(dtype)
    return scale * mk(B, H, L, d), scale * mk(B, H, L, d), mk(B, H, L, dv)


def padding_mask(B, L, left=3, right=4):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :left] = False
    mask[-1, L - right :] = False
    return mask


def attention(window, kernel="softmax", d=8, H=3, m=64, chunk=8, dtype=D64):
    cfg = PerformerConfig(nb_features=m, kernel=kernel, local_window=window, chunk_size=chunk, seed=3)
    return FavorAttention(d, cfg, num_heads=H).to(dtype)


def max_err(a, b, valid=None):
    if valid is not None:
        a, b = a[valid], b[valid]
    return ((a - b).abs().max() / b.abs().max()).item()


def test_band_unband_and_rows():
    m = torch.arange(5 * 9, dtype=D64).reshape(5, 9)  # C = 5 queries, span C + 2w with w = 2
    b = band(m, 5)
    assert all(b[i, j] == m[i, i + j] for i in range(5) for j in range(5))
    expected = torch.zeros(5, 9, dtype=D64)
    for i in range(5):
        expected[i, i : i + 5] = m[i, i : i + 5]
    assert torch.equal(unband(b, 9), expected)
    assert torch.equal(band(m.t().contiguous().t(), 5), b)  # rows not contiguous: copied first
    with pytest.raises(ValueError, match="width 6 reaches past the 9 columns"):
        band(m, 6)
    x = torch.arange(7 * 2, dtype=D64).reshape(1, 1, 7, 2)
    for start, count in [(-2, 5), (0, 7), (3, 8), (-1, 10), (2, 3)]:
        got = rows(x, start, count)
        for i in range(count):
            p = start + i
            assert torch.equal(got[0, 0, i], x[0, 0, p] if 0 <= p < 7 else torch.zeros(2, dtype=D64))
    assert rows(torch.ones(1, 7, dtype=torch.bool), -2, 11).tolist() == [[False] * 2 + [True] * 7 + [False] * 2]


@pytest.mark.parametrize(("blocks", "block", "window"), [(3, 16, 4), (4, 8, 4), (2, 24, 9), (3, 16, 1)])
def test_banded_products_equal_explicit_sums(blocks, block, window):
    """local.near / band_apply / the transposed product through flip_band on the block layout (query row i, key rows
    i .. i + 2w) against explicit loops; the last block of rows of each (b, h) is scratch and skipped."""
    g = torch.Generator().manual_seed(blocks * block + window)
    B, H, P, C, W = 2, 3, blocks * block, 5, 2 * window + 1
    x, y = torch.randn(B, H, P, C, generator=g, dtype=D64), torch.randn(B, H, P, C, generator=g, dtype=D64)
    coef = torch.randn(B, H, P, W, generator=g, dtype=D64)
    coef[:, :, P - block :] = 0
    fav, applied = near(x, y, block, window), band_apply(coef, y, block, window)
    back = band_apply(flip_band(coef, window), x, block, window)  # row r: key row r + 2w
    ref_back = torch.zeros_like(x)
    for i in range(P - block):
        for j in range(W):
            assert torch.allclose(fav[:, :, i, j], (x[:, :, i] * y[:, :, i + j]).sum(-1))
            ref_back[:, :, i + j] += coef[:, :, i, j, None] * x[:, :, i]
        assert torch.allclose(applied[:, :, i], (coef[:, :, i, :, None] * y[:, :, i : i + W]).sum(2))
    assert torch.allclose(back[:, :, : P - block], ref_back[:, :, W - 1 : P - block + W - 1])


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference_with_exact_window_pairs(kernel, causal, window, masked):
    q, k, v = qkv()  # L = 37 is not a multiple of the chunk size 8
    mask = padding_mask(2, 37, left=0 if causal else 3) if masked else None
    att = attention(window, kernel)
    out = att(q, k, v, causal=causal, key_padding_mask=mask)
    fmap = att._prepare(q, k, causal, mask, None)
    ref = naive_linear_attention(q, k, v, fmap, causal=causal, key_padding_mask=mask, local_window=window)
    valid = None if mask is None else mask[:, None, :, None].expand_as(out)
    assert max_err(out, ref, valid) < 1e-10
    # and the window changes the result: without it the same features give another output
    plain = naive_linear_attention(q, k, v, fmap, causal=causal, key_padding_mask=mask)
    assert max_err(plain, ref, valid) > 1e-3


# fitted statistics give per-head transforms, aligned per-head projections and their per-feature log weights
# ([B, H, L, ·] broadcasting): the hand-written ops must apply them to every key row, the causal window's halo rows
# included, and fold the log weights into the right references (4 chunks, 3 heads)
@pytest.mark.parametrize(("recompute", "fitted", "kernel", "window"),
                         [(False, False, "softmax", 2), (True, False, "softmax", 2), (False, True, "softmax", 2),
                          (False, True, "favor++", 2), (False, True, "softmax", 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_values_and_gradients_match_autograd_through_the_reference(causal, recompute, fitted, kernel, window,
                                                                   monkeypatch):
    monkeypatch.setattr(ops_common, "RECOMPUTE_ABOVE", 0 if recompute else 1 << 40)  # graph recomputed or kept
    q, k, v = (x.requires_grad_(True) for x in qkv(L=30))
    mask = padding_mask(2, 30, left=0)
    att = attention(window, kernel)
    if fitted:
        att.calibrate_statistics(q.detach(), k.detach(), mask, causal=causal)
    fmap = att._prepare(q, k, causal, mask, None)
    if fitted:  # per-head terms in play (bidirectional: measured per call without fitting too)
        assert fmap.k_shift.shape[1] == 3 and (kernel != "softmax" or fmap.feature_bias.shape[0] == 3)
    g = torch.randn(2, 3, 30, 5, dtype=D64) * mask[:, None, :, None]
    out = att(q, k, v, causal=causal, key_padding_mask=mask)
    ref = naive_linear_attention(q, k, v, fmap, causal, mask, local_window=window)
    assert_values_and_gradients(out, ref, (q, k, v), g, mask[:, None, :, None].expand_as(out))


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=1, L=11, d=3, dv=2))
    fmap = FeatureMap("softmax", draw_projection(6, 3, seed=1))  # fixed features (the module's are data-dependent)
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 9:] = False

    def f(q, k, v):
        if causal:
            return favor_causal(q, k, v, fmap, mask, 4, local_window=2)
        return favor_bidirectional(q, k, v, fmap, mask, local_window=2)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_a_window_covering_every_key_is_exact_softmax_even_at_large_logits(causal, dtype):
    # logits of several hundred: exp() of them overflows float32 unless the exact terms are rescaled
    q, k, v = qkv(L=23, scale=4.0, dtype=dtype)
    mask = padding_mask(2, 23, left=0 if causal else 3)
    att = attention(23, dtype=dtype)
    out = att(q, k, v, causal=causal, key_padding_mask=mask)
    ref = exact_softmax_attention(q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    valid = mask[:, None, :, None].expand_as(out)
    assert max_err(out, ref, valid) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_window_lowers_the_error_of_local_attention_patterns():
    # queries that attend mostly to their neighbours (a positional head): q_i . k_j large for |i - j| <= 1
    L, d = 64, 16
    pos = torch.randn(L, d, dtype=D64, generator=torch.Generator().manual_seed(1))
    q = pos[None, None]
    k = (pos + torch.roll(pos, 1, 0) + torch.roll(pos, -1, 0))[None, None]
    v = torch.randn(1, 1, L, 4, dtype=D64, generator=torch.Generator().manual_seed(2))
    ref = exact_softmax_attention(q, k, v)
    errors = [((attention(w, d=d, H=1)(q, k, v) - ref).norm() / ref.norm()).item() for w in (0, 1, 4)]
    assert errors[1] < 0.8 * errors[0] and errors[2] < errors[1], errors


def test_no_look_ahead_with_a_huge_future_key():
    q, k, v = qkv(B=1, H=2, L=40, scale=1.0, dtype=torch.float32)
    att = attention(3, H=2, chunk=16, dtype=torch.float32)
    base = att(q, k, v, causal=True)
    for t in (5, 16, 17, 39):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] *= 6.0
        v2[:, :, t] = 1e3
        out = att(q, k2, v2, causal=True)
        assert torch.equal(out[:, :, :t], base[:, :, :t])
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


MIXED_STEPS = [(0, 1), (1, 2), (2, 9), (9, 10), (10, 23), (23, 29)]


@pytest.mark.parametrize("masked", [True, False], ids=["left_padded", "no_mask"])
@pytest.mark.parametrize("steps", [MIXED_STEPS, [(t, t + 1) for t in range(29)]], ids=["mixed", "one_token_each"])
@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
def test_decoding_steps_equal_the_causal_pass_and_keep_a_constant_state(kernel, steps, masked):
    """Steps of several tokens run the causal op from the state; single tokens the short path of
    ``recurrent._one_token`` (generate's every step), whose window is the state's last w keys and the new one."""
    q, k, v = qkv(L=29)
    mask = padding_mask(2, 29, left=5, right=0) if masked else None
    att = attention(3, kernel, chunk=4)
    full = att(q, k, v, causal=True, key_padding_mask=mask)
    state, outs, sizes = None, [], []
    for a, b in steps:
        out, state = att.step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state,
                              key_padding_mask=None if mask is None else mask[:, a:b])
        outs.append(out)
        sizes.append(state.nbytes)
    valid = None if mask is None else mask[:, None, :, None].expand_as(full)
    assert max_err(torch.cat(outs, 2), full, valid) < 1e-10
    assert state.wk.shape == (2, 3, 3, 8) and state.wv.shape == (2, 3, 3, 5)
    assert len(set(sizes[2:])) == 1  # constant once the window is full


@pytest.mark.parametrize("bad", [-1, True, 2.0])
def test_config_rejects_bad_windows(bad):
    with pytest.raises(ValueError, match="local_window"):
        PerformerConfig(local_window=bad)


@pytest.mark.parametrize("kernel", ["relu", "trig"])
def test_config_rejects_a_window_with_kernels_without_an_exact_form(kernel):
    with pytest.raises(ValueError, match="local_window"):
        PerformerConfig(kernel=kernel, local_window=2)


@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_inputs_stay_finite_and_close(causal):
    q, k, v = qkv(L=40, scale=1.5)
    att = attention(3)
    ref = att(q, k, v, causal=causal)
    x = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    out = att.float()(*x, causal=causal)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(t.grad.float()).all() for t in x)
    assert max_err(out.double(), ref) < 0.05  # bf16 rounding of q, k, v and of the output
