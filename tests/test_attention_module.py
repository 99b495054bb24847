"""FavorAttention (the public module) against exact softmax attention and its own contracts."""

import pytest
import torch

from hf_performer import FavorAttention, PerformerConfig
from hf_performer.ops import exact_softmax_attention

D64 = torch.float64


def qkv(B=2, H=4, L=64, d=16, dtype=D64, q_norm=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=D64)
    # after the d^-1/4 scaling |q| ≈ q_norm; keys share a common offset (as real keys do)
    q = mk(B, H, L, d) * q_norm * d**-0.25
    k = (mk(B, H, L, d) + 2.0 * mk(1, H, 1, d)) * q_norm * d**-0.25
    return q.to(dtype), k.to(dtype), mk(B, H, L, d).to(dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("causal", [False, True])
def test_error_to_exact_softmax_falls_as_features_grow(causal):
    q, k, v = qkv()
    ref = exact_softmax_attention(q, k, v, causal=causal)
    errs = []
    for m in (16, 128, 1024):
        total = 0.0
        for seed in range(3):
            attn = FavorAttention(16, PerformerConfig(nb_features=m, seed=seed), num_heads=4)
            if causal:  # causal attention uses stored statistics (it cannot look ahead for them)
                attn.calibrate_statistics(q, k)
            total += rel(attn(q, k, v, causal=causal), ref)
        errs.append(total)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] / 3 < 0.1


def test_key_centering_and_balancing_lower_the_error_on_offset_keys():
    q, k, v = qkv(q_norm=1.5)
    ref = exact_softmax_attention(q, k, v)

    def err(center, balance):
        cfg = PerformerConfig(nb_features=128, center_keys=center, balance_qk=balance)
        return sum(rel(FavorAttention(16, PerformerConfig.from_dict({**cfg.to_dict(), "seed": s}))(q, k, v), ref) for s in range(4))

    assert err(True, True) < 0.7 * err(False, False)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_left_and_right_equals_per_example(causal):
    attn = FavorAttention(16, PerformerConfig(nb_features=64), num_heads=4)
    q, k, v = qkv(B=1, L=30)
    if causal:
        attn.calibrate_statistics(q, k)
    ref = attn(q, k, v, causal=causal)
    for left, right in [(4, 0), (0, 6)]:
        L = 30 + left + right
        pad = lambda x, left=left, right=right: torch.cat([x[:, :, :left] * 0 + 5, x, x[:, :, :right] * 0 - 3], 2)
        mask = torch.zeros(1, L, dtype=torch.bool)
        mask[:, left : left + 30] = True
        out = attn(pad(q), pad(k), pad(v), causal=causal, key_padding_mask=mask)
        assert torch.allclose(out[:, :, left : left + 30], ref, atol=1e-12, rtol=1e-9)


def test_calibrated_causal_has_no_look_ahead_and_steps_match():
    attn = FavorAttention(16, PerformerConfig(nb_features=64, kernel="favor++", chunk_size=8), num_heads=4)
    q, k, v = qkv(L=40)
    attn.calibrate_statistics(q, k)
    assert bool(attn.stats_calibrated) and attn.oprf_rho.abs().sum() > 0
    full = attn(q, k, v, causal=True)
    k2 = k.clone()
    k2[:, :, 30] *= 10
    assert torch.equal(attn(q, k2, v, causal=True)[:, :, :30], full[:, :, :30])
    state, outs = None, []
    for t in range(40):
        out, state = attn.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outs.append(out)
    assert torch.allclose(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
def test_module_gradcheck_with_calibrated_statistics(causal, kernel):
    attn = FavorAttention(4, PerformerConfig(nb_features=8, kernel=kernel, chunk_size=4), num_heads=2)
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=2, L=7, d=4))
    attn.calibrate_statistics(q.detach(), k.detach(), causal=causal)
    assert torch.autograd.gradcheck(lambda q, k, v: attn(q, k, v, causal=causal), (q, k, v))


def test_per_sequence_statistics_are_constants_of_the_backward():
    # uncalibrated bidirectional attention measures its key shift and balance on the sequence; like the
    # random features they are constants of the estimator, so its gradient is that of the same
    # computation with the statistics detached (the estimator's expectation does not depend on them)
    cfg = PerformerConfig(nb_features=16, chunk_size=4)
    attn = FavorAttention(4, cfg, num_heads=2)
    q, k, v = (x.requires_grad_(True) for x in qkv(B=2, H=2, L=9, d=4))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    g = torch.randn(2, 2, 9, 4, dtype=D64)
    fast = torch.autograd.grad((attn(q, k, v, key_padding_mask=mask) * g).sum(), (q, k, v))
    fmap = attn._prepare(q.detach(), k.detach(), False, mask, None)
    from hf_performer.ops import naive_linear_attention

    slow = torch.autograd.grad((naive_linear_attention(q, k, v, fmap, key_padding_mask=mask) * g).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_redraw_is_deterministic_across_instances_and_survives_state_dict():
    cfg = PerformerConfig(nb_features=32, seed=5)
    a, b = FavorAttention(16, cfg, layer_id=2), FavorAttention(16, cfg, layer_id=2)
    other_layer = FavorAttention(16, cfg, layer_id=3)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, other_layer.projection)
    first = a.projection.clone()
    a.redraw_features()
    b.redraw_features()
    assert int(a.draw_count) == 1 and torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, first)
    c = FavorAttention(16, cfg, layer_id=2)
    c.load_state_dict(a.state_dict())
    c.redraw_features()
    a.redraw_features()
    assert torch.equal(a.projection, c.projection)  # a resumed module continues the same sequence


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
@pytest.mark.parametrize("causal", [False, True])
def test_stored_transforms_follow_the_statistics_buffers(causal, kernel):
    """A calibrated layer reuses the transforms of its stored statistics between calls; every way the statistics
    change (another calibration, a checkpoint load, an in-place edit, a move to another dtype) must reach the next
    call: its output equals a fresh module's with the same buffers."""
    cfg = PerformerConfig(nb_features=32, kernel=kernel, seed=1)
    q, k, v = qkv(B=1, H=4, L=24, d=16)
    att = FavorAttention(16, cfg, num_heads=4).double()

    def fresh():
        other = FavorAttention(16, cfg, num_heads=4).double()
        other.load_state_dict(att.state_dict())
        return other(q, k, v, causal=causal)

    att.calibrate_statistics(q, k, causal=causal)
    att(q, k, v, causal=causal)  # the transforms are now cached
    att.calibrate_statistics(q * 1.5, k + 0.3, causal=causal)
    assert torch.equal(att(q, k, v, causal=causal), fresh())
    donor = FavorAttention(16, cfg, num_heads=4).double()
    donor.calibrate_statistics(q + 0.2, k * 0.7, causal=causal)
    att.load_state_dict(donor.state_dict())
    assert torch.equal(att(q, k, v, causal=causal), fresh())
    with torch.no_grad():
        att.key_shift.add_(0.1)
        att.log_qk_scale.mul_(0.5)
        att.oprf_rho.add_(0.05)
    assert torch.equal(att(q, k, v, causal=causal), fresh())
    for _ in range(2):  # buffers replaced by new tensors (version 0 both times: only their identity differs)
        att.key_shift, att.log_qk_scale = torch.randn_like(att.key_shift) * 0.1, torch.randn_like(att.log_qk_scale) * 0.1
        assert torch.equal(att(q, k, v, causal=causal), fresh())
    att.float()
    out = att(q.float(), k.float(), v.float(), causal=causal)
    assert out.dtype == torch.float32 and (out.double() - fresh()).abs().max() < 1e-4


@pytest.mark.parametrize("kernel", ["relu", "trig", "softmax"])
def test_a_call_in_inference_mode_does_not_break_a_later_backward(kernel):
    """Transforms cached in ``torch.inference_mode`` (an evaluation) are inference tensors, which autograd cannot
    save: training after it must not reuse them (relu and trig differentiate through the transforms by autograd)."""
    att = FavorAttention(16, PerformerConfig(nb_features=32, kernel=kernel), num_heads=2)
    q, k, v = qkv(B=1, H=2, L=10, d=16, dtype=torch.float32)
    att.calibrate_statistics(q, k)
    with torch.inference_mode():
        expected = att(q, k, v)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    out = att(*x)
    out.sum().backward()
    assert torch.equal(out.detach(), expected) and all(t.grad is not None for t in x)


def test_half_precision_casts_keep_projection_fp32():
    attn = FavorAttention(16, PerformerConfig(nb_features=32)).to(torch.bfloat16)
    assert attn.projection.dtype == torch.float32
    q, k, v = qkv(B=1, L=20, dtype=torch.bfloat16)
    out = attn(q, k, v)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    attn = FavorAttention(16, PerformerConfig(nb_features=8), num_heads=4)
    q, k, v = qkv(L=10)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attn(q, k, v, key_padding_mask=torch.ones(2, 1, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="not floating point"):
        attn(q, k, v, key_padding_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"\[batch, heads, length, head_dim\]"):
        attn(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="head_dim"):
        attn(q[..., :8], k[..., :8], v)
    with pytest.raises(ValueError, match="num_heads"):
        FavorAttention(16, PerformerConfig(nb_features=8), num_heads=3).calibrate_statistics(q, k)
    with pytest.raises(ValueError, match="head_dim"):
        FavorAttention(0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_long_large_norm_inputs_stay_finite(dtype, causal):
    # L = 16384, |q|, |k| up to ~9 after the d^-1/4 scaling (as in real BERT layers)
    attn = FavorAttention(64, PerformerConfig(nb_features=64, chunk_size=256), num_heads=2)
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 16384, 64, generator=g) * 3 * 64**0.25 * 64**-0.5 * 3).to(dtype).requires_grad_(True)
    k = (torch.randn(1, 2, 16384, 64, generator=g) * 3 * 64**0.25 * 64**-0.5 * 3).to(dtype).requires_grad_(True)
    v = torch.randn(1, 2, 16384, 64, generator=g).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out = attn(q, k, v, causal=causal)
    out.float().square().mean().backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_statistics_step_samples_pairs_by_attention_beyond_2_to_the_24_pairs():
    """65 sequences x 512 queries x 512 keys is more pairs than one torch.multinomial takes (2^24): the proposal
    centres are still drawn, and in proportion to the exact attention: here every query attends (almost) only to
    key 0, so every centre is some q_t + k_0."""
    from hf_performer.attention import NB_CENTERS

    torch.manual_seed(0)
    B, L, d = 65, 512, 4
    q = torch.randn(B, 1, L, d) * 0.1
    q[..., 0] = 3.0
    k = torch.randn(B, 1, L, d) * 0.1
    k[:, :, 0, 0] = 16.0  # scaled q.k with key 0: ~ 3 * 16 / 2 = 24 nats above any other key
    m = FavorAttention(d, PerformerConfig(nb_features=8), num_heads=1)
    m.calibrate_statistics(q, k)
    centers = m.proposal_centers[0]  # [NB_CENTERS, d], q' + k' of the sampled pairs (transformed inputs)
    assert centers.shape == (NB_CENTERS, d) and torch.isfinite(centers).all()
    a, root, shift = m.log_qk_scale.exp()[0], d**-0.25, m.key_shift[0, 0]
    with_key0 = 3.0 * root * a + (16.0 * root - shift) / a  # first coordinate of q' + k' with key 0
    with_other = 3.0 * root * a + (0.0 * root - shift) / a  # ... with any other key
    first = centers[:, 0]
    assert ((first - with_key0).abs() < (first - with_other).abs()).all()
    assert (first - with_key0).abs().max() < 0.5 * abs(with_key0 - with_other)


@pytest.mark.parametrize(("causal", "window"), [(False, 0), (False, 2), (True, 0), (True, 2)])
def test_backward_inside_autocast_equals_backward_outside(causal, window):
    """A training loop may call backward() inside its autocast region (it then runs in that region's autocast state):
    the hand-written backwards run without autocast, as their forwards do, so the gradients are those of a backward
    outside the region (before, the causal and window backwards failed on mixed dtypes in baddbmm_, and the
    bidirectional one lost its float32 products)."""
    att = FavorAttention(16, PerformerConfig(nb_features=32, chunk_size=8, local_window=window), num_heads=2)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    att.calibrate_statistics(q, k, causal=causal)
    grads = []
    for inside in (False, True):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = att(*(t.bfloat16() for t in x), causal=causal).float().square().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([t.grad for t in x])
    for outside, inside in zip(*grads):
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_float16_autocast_does_not_reach_the_statistics(causal):
    """Under float16 autocast the statistics (moments of q and k, the calibration's q k^T for its pair sampling) stay
    in float32: |q|^2 of large queries exceeds float16's range (inf: NaN statistics, NaN outputs before), and the
    results equal those without autocast."""
    q, k, v = (torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(i)) * 80 for i in range(3))
    results = []
    for autocast in (False, True):
        att = FavorAttention(16, PerformerConfig(nb_features=32), num_heads=2)
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            uncalibrated = att(q, k, v)  # bidirectional: statistics measured on the sequence
            att.calibrate_statistics(q, k, causal=causal)
            calibrated = att(q, k, v, causal=causal)
        results.append([uncalibrated, calibrated, att.key_shift, att.log_qk_scale, att.proposal_centers])
    assert all(torch.isfinite(t).all() for t in results[1])
    for plain, autocast in zip(*results):
        torch.testing.assert_close(autocast, plain, rtol=0, atol=0)


def test_buffers_cast_around_module_to_are_named_once(monkeypatch):
    """Module.to() keeps the FAVOR+ buffers float32; FSDP1's MixedPrecision(buffer_dtype=bf16) casts them around it,
    which rounded the features and every later redraw without a word (found in a bug hunt): the forward warns."""
    import warnings

    import hf_performer.attention as attention_module

    monkeypatch.setattr(attention_module, "_HALF_BUFFERS_WARNED", [])
    q = torch.randn(1, 2, 8, 16)
    fa = FavorAttention(16, PerformerConfig(nb_features=16), num_heads=2).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa(q.bfloat16(), q.bfloat16(), q.bfloat16())  # .to() kept them float32: silent
    fa._buffers["projection"] = fa.projection.bfloat16()  # what FSDP1's buffer cast does
    with pytest.warns(UserWarning, match="bypasses Module.to"):
        fa(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fa(q, q, q)  # once per process
