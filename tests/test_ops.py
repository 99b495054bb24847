"""Fast FAVOR ops against their O(L^2) references (flash-linear-attention style parity tests)."""

import pytest
import torch

from hf_performer.features import FeatureMap, draw_projection, oprf_a
from hf_performer.ops import favor_bidirectional, favor_causal, favor_step, naive_linear_attention

D64 = torch.float64
KERNELS = ["softmax", "favor++", "relu", "trig"]


def fmap_for(kernel, d=8, m=16, seed=0):
    w = draw_projection(m // 2 if kernel == "trig" else m, d, seed=seed)
    a = oprf_a(torch.tensor(0.7, dtype=D64)) if kernel == "favor++" else None
    return FeatureMap(kernel, w, a=a)


def qkv(B=2, H=3, L=37, d=8, dv=5, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=D64)
    return scale * mk(B, H, L, d), scale * mk(B, H, L, d), mk(B, H, L, dv)


def padding_mask(B, L, left=3, right=4):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :left] = False  # row 0 left-padded
    mask[-1, L - right :] = False  # last row right-padded
    return mask


def bidirectional(q, k, v, fmap, mask=None, chunk_size=None):  # one pass: no chunk size
    return favor_bidirectional(q, k, v, fmap, mask)


OPS = {False: bidirectional, True: favor_causal}


def rel_err(a, b, valid=None):
    if valid is not None:
        a, b = a[valid], b[valid]
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_values_and_gradients(out, ref, inputs, g, valid=None, tol=1e-10, grad_tol=1e-9):
    """out against its reference ref (relative error on ``valid``), and the gradients of (out * g).sum() and
    (ref * g).sum() with respect to ``inputs``."""
    assert rel_err(out, ref, valid) < tol
    fast = torch.autograd.grad((out * g).sum(), inputs)
    slow = torch.autograd.grad((ref * g).sum(), inputs)
    for a, b in zip(fast, slow):
        assert rel_err(a, b) < grad_tol


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_ops_match_naive_linear_attention(kernel, causal, masked):
    q, k, v = qkv()  # L = 37 is not a multiple of the chunk size 8
    mask = padding_mask(2, 37) if masked else None
    fmap = fmap_for(kernel)
    op = OPS[causal]
    out = op(q, k, v, fmap, mask, chunk_size=8)
    ref = naive_linear_attention(q, k, v, fmap, causal=causal, key_padding_mask=mask)
    valid = None if mask is None else mask[:, None, :, None].expand_as(out)
    tol = 1e-9 if kernel == "trig" else 1e-10  # trig's normaliser can come close to 0
    assert rel_err(out, ref, valid) < tol


@pytest.mark.parametrize("kernel", KERNELS)
def test_recurrent_steps_equal_the_causal_pass(kernel):  # single tokens take recurrent._one_token
    q, k, v = qkv(L=29)
    fmap, mask = fmap_for(kernel), padding_mask(2, 29, left=5, right=0)
    full = favor_causal(q, k, v, fmap, mask, chunk_size=8)
    state, outs = None, []
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 23), (23, 29)]:  # single tokens and multi-token steps
        out, state = favor_step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], fmap, state, mask[:, a:b], chunk_size=4)
        outs.append(out)
    valid = mask[:, None, :, None].expand_as(full)
    assert rel_err(torch.cat(outs, 2), full, valid) < 1e-10
    assert state.S.shape == (2, 3, 16, 5) and state.z.shape == (2, 3, 16)


def test_causal_output_at_t_equals_bidirectional_on_the_prefix():
    q, k, v = qkv(B=1, L=21)
    fmap = fmap_for("softmax")
    causal = favor_causal(q, k, v, fmap, chunk_size=4)
    for t in (0, 3, 4, 12, 20):
        prefix = favor_bidirectional(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], fmap)
        assert rel_err(causal[:, :, t], prefix[:, :, t]) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_no_look_ahead_even_with_a_huge_future_key(dtype):
    q, k, v = (x.to(dtype) for x in qkv(B=1, H=2, L=40, scale=1.0))
    fmap = fmap_for("softmax")
    fmap.projection = fmap.projection.to(dtype)
    base = favor_causal(q, k, v, fmap, chunk_size=16)
    for t in (5, 16, 17, 39):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] *= 6.0  # a key far larger than every earlier one (in its own chunk too)
        v2[:, :, t] = 1e3
        out = favor_causal(q, k2, v2, fmap, chunk_size=16)
        assert torch.equal(out[:, :, :t], base[:, :, :t])  # bit for bit
        assert not torch.equal(out[:, :, t:], base[:, :, t:])


@pytest.mark.parametrize("causal", [False, True])
def test_padding_equals_unpadded_computation(causal):
    q, k, v = qkv(B=1, L=20)
    fmap = fmap_for("softmax")
    op = OPS[causal]
    ref = op(q, k, v, fmap, chunk_size=8)
    for left, right in [(5, 0), (0, 7), (3, 2)]:
        pad = lambda x, left=left, right=right: torch.cat(
            [torch.randn_like(x[:, :, :left]) * 3, x, torch.randn_like(x[:, :, :right]) * 3], 2
        )
        mask = torch.zeros(1, left + 20 + right, dtype=torch.bool)
        mask[:, left : left + 20] = True
        out = op(pad(q), pad(k), pad(v), fmap, mask, chunk_size=8)
        assert rel_err(out[:, :, left : left + 20], ref) < 1e-10


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(kernel, causal):
    q, k, v = (x.requires_grad_(True) for x in qkv(B=1, H=1, L=10, d=3, dv=2))
    fmap = fmap_for(kernel, d=3, m=6)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, :2] = False
    op = OPS[causal]
    for m in (None, mask):
        assert torch.autograd.gradcheck(lambda q, k, v, m=m: op(q, k, v, fmap, m, 4), (q, k, v))


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_autograd_through_the_naive_reference(causal, recompute, monkeypatch):
    from hf_performer.ops import common

    monkeypatch.setattr(common, "RECOMPUTE_ABOVE", 0 if recompute else 1 << 40)  # graph recomputed or kept
    q, k, v = (x.requires_grad_(True) for x in qkv(L=30))
    # right padding only: a left-padded causal row has queries that see no key (0/0 in the reference)
    fmap, mask = fmap_for("softmax"), padding_mask(2, 30, left=0)
    g = torch.randn(2, 3, 30, 5, dtype=D64) * mask[:, None, :, None]
    op = OPS[causal]
    fast = torch.autograd.grad((op(q, k, v, fmap, mask, 8) * g).sum(), (q, k, v))
    slow = torch.autograd.grad((naive_linear_attention(q, k, v, fmap, causal, mask) * g).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("form", ["matrix", "recurrence"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("n", "group"), [(5, 64), (37, 4), (70, 8)])  # one group, several, a log-depth scan
@pytest.mark.parametrize("monotone", [True, False])  # running maxima (forward), or any c below the targets (backward)
def test_exclusive_prefix_of_chunk_summaries_matches_the_explicit_sum(n, group, reverse, form, monotone):
    from hf_performer.ops.scan import exclusive_prefix

    g = torch.Generator().manual_seed(n)
    K = torch.randn(1, n, 3, 2, generator=g, dtype=D64, requires_grad=True)
    c = 30 * torch.randn(1, n, 3, generator=g, dtype=D64)  # spread over ~200 nats: weights from 1 down to underflow
    if monotone:
        c = torch.cummax(c, 1).values
    # t_i >= max_{j<i} c_j (the first target is free): t_i >= c_j for every j that reaches i
    t = torch.cat([c[:, :1], torch.cummax(c, 1).values[:, :-1]], 1) + torch.rand(1, n, 3, generator=g, dtype=D64)
    if reverse:  # the mirror image: references that grow towards the start
        c, t = c.flip(1), t.flip(1)
    out = exclusive_prefix(K, c, t, group=group, reverse=reverse, form=form)
    for i in range(n):
        reach = range(i + 1, n) if reverse else range(i)
        ref = sum((K[:, j] * torch.exp(c[:, j] - t[:, i])[..., None] for j in reach), torch.zeros_like(K[:, 0]))
        assert rel_err(out[:, i], ref) < 1e-12 if len(reach) else torch.equal(out[:, i], ref)
    # (the prefix is linear in K: for the longer scans a random projection of its Jacobian, gradcheck's fast mode,
    # checks the transpose; the full Jacobian took ~10 s a case, 420 columns of 70-step recurrences)
    assert torch.autograd.gradcheck(lambda K: exclusive_prefix(K, c, t, group=group, reverse=reverse, form=form), (K,),
                                    fast_mode=n > 5)


@pytest.mark.parametrize("form", ["matrix", "recurrence"])
@pytest.mark.parametrize("n", [1, 5, 37])
@pytest.mark.parametrize("grad", [False, True])
def test_exclusive_prefix_also_gives_the_total_of_every_summary(n, form, grad):
    """``total=``: sum_j K_j e^{c_j - max c}, the returned state of a causal pass (the recurrence's one more step
    without autograd, else the weighted sum), against the explicit sum; the prefix itself is unchanged."""
    from hf_performer.ops.scan import exclusive_prefix

    g = torch.Generator().manual_seed(n)
    K = torch.randn(1, n, 3, 2, generator=g, dtype=D64, requires_grad=grad)
    c = torch.cummax(30 * torch.randn(1, n, 3, generator=g, dtype=D64), 1).values
    t = torch.cat([c[:, :1], c[:, :-1]], 1) + 1.0
    total = []
    with torch.set_grad_enabled(grad):
        out = exclusive_prefix(K, c, t, group=4, form=form, total=total)
    ref = sum(K[:, j] * torch.exp(c[:, j] - c[:, -1])[..., None] for j in range(n))
    assert len(total) == 1 and rel_err(total[0], ref) < 1e-12
    assert torch.equal(out, exclusive_prefix(K, c, t, group=4, form=form))
    if grad:  # differentiable when autograd is on
        (gK,) = torch.autograd.grad(total[0].sum(), K)
        assert rel_err(gK, torch.exp(c - c[:, -1:])[..., None].expand_as(K)) < 1e-12


def test_exclusive_prefix_picks_its_form_by_device_and_length(monkeypatch):
    """The recurrence runs on a CPU up to RECURRENCE_MAX chunks, the matrix form otherwise; an unknown form raises."""
    from hf_performer.ops import scan

    calls = []
    monkeypatch.setattr(scan, "_recurrence", lambda K, c, t, reverse: calls.append(K.shape[-3]) or torch.zeros_like(K))
    K, c = torch.randn(1, scan.RECURRENCE_MAX + 1, 3, 2), torch.zeros(1, scan.RECURRENCE_MAX + 1, 3)
    scan.exclusive_prefix(K[:, :8], c[:, :8], c[:, :8])
    scan.exclusive_prefix(K, c, c)
    assert calls == [8]
    with pytest.raises(ValueError, match="form='loop'"):
        scan.exclusive_prefix(K, c, c, form="loop")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 2])
def test_cpu_segments_equal_one_pass_in_value_and_gradient(causal, window, monkeypatch):
    """On a CPU, long inputs run segment by segment (common.cpu_segment); the result must not depend on it."""
    from hf_performer.ops import common

    q, k, v = (x.requires_grad_(True) for x in qkv(L=45))
    fmap, mask = fmap_for("favor++"), padding_mask(2, 45, left=11, right=9)  # a padding-only segment too
    g = torch.randn(2, 3, 45, 5, dtype=D64) * mask[:, None, :, None]

    def run():
        if causal:
            out = favor_causal(q, k, v, fmap, mask, 4, local_window=window)
        else:
            out = favor_bidirectional(q, k, v, fmap, mask, local_window=window)
        return out, torch.autograd.grad((out * g).sum(), (q, k, v))

    monkeypatch.setattr(common, "CPU_SEGMENT_BYTES", 1 << 40)  # one pass
    whole, whole_grads = run()
    monkeypatch.setattr(common, "CPU_SEGMENT_BYTES", 2 * 3 * 16 * 8 * 8)  # 8 positions per segment
    monkeypatch.setattr(common, "MIN_CPU_SEGMENT", 1)
    assert common.cpu_segment(q, 45, 16, 4) == 8
    parts, part_grads = run()
    valid = mask[:, None, :, None].expand_as(whole)
    assert rel_err(parts, whole, valid) < 1e-12
    for a, b in zip(part_grads, whole_grads):
        assert rel_err(a, b) < 1e-10


def transformed_fmap(kernel, H=3, d=8, m=16, batched=False):
    """A feature map with every exact input transform (per-head scales and key shift), per-head A (favor++), and
    optionally a per-head projection with importance-sampling biases (the aligned features of calibrated layers)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(H, m, d, generator=g, dtype=D64) if batched else draw_projection(m, d, seed=1).to(D64)
    bias = 0.1 * torch.randn(H, m, generator=g, dtype=D64) if batched else None
    a = oprf_a(torch.rand(1, H, 1, 1, generator=g, dtype=D64)) if kernel == "favor++" else None
    scale = lambda: 0.5 + torch.rand(1, H, 1, 1, generator=g, dtype=D64)
    shift = 0.2 * torch.randn(1, H, 1, d, generator=g, dtype=D64)
    return FeatureMap(kernel, w, a=a, bias=bias, q_scale=scale(), k_scale=scale(), k_shift=shift)


@pytest.mark.parametrize(("kernel", "batched"), [("softmax", False), ("softmax", True), ("favor++", False)])
@pytest.mark.parametrize("query", [False, True])
def test_hand_written_feature_logits_vjp_matches_autograd(kernel, batched, query):
    fmap = transformed_fmap(kernel, batched=batched)
    x = qkv()[0].requires_grad_(True)  # [2, 3, 37, 8]
    logits, _ = fmap(x, query=query)
    grad = torch.randn_like(logits)
    (ref,) = torch.autograd.grad(logits, x, grad)
    assert rel_err(fmap.logits_vjp(x.detach(), grad, query=query), ref) < 1e-12


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
@pytest.mark.parametrize("segmented", [False, True])
def test_bidirectional_hand_written_backward_matches_autograd(kernel, segmented, monkeypatch):
    """The positive kernels' bidirectional op has its own backward: against autograd through the naive reference
    (transforms, padding, one pass and CPU segments), and gradcheck."""
    from hf_performer.ops import common

    monkeypatch.setattr(common, "CPU_SEGMENT_BYTES", 2 * 3 * 16 * 8 * 8 if segmented else 1 << 40)
    monkeypatch.setattr(common, "MIN_CPU_SEGMENT", 1)
    fmap = transformed_fmap(kernel)
    q, k, v = (x.requires_grad_(True) for x in qkv(L=30))
    mask = padding_mask(2, 30, left=3, right=12)
    g = torch.randn(2, 3, 30, 5, dtype=D64)
    fast = torch.autograd.grad((favor_bidirectional(q, k, v, fmap, mask) * g).sum(), (q, k, v))
    slow = torch.autograd.grad((naive_linear_attention(q, k, v, fmap, False, mask) * g).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        assert rel_err(a, b) < 1e-9
    assert torch.equal(fast[1][0, :, :3], torch.zeros_like(fast[1][0, :, :3]))  # padded keys: exactly 0
    assert torch.equal(fast[2][1, :, -12:], torch.zeros_like(fast[2][1, :, -12:]))
    small = [x.detach()[:1, :1, :12].requires_grad_(True) for x in (q, k, v)]
    fm1 = transformed_fmap(kernel, H=1)
    assert torch.autograd.gradcheck(lambda q, k, v: favor_bidirectional(q, k, v, fm1, mask[:1, :12]), small)


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
@pytest.mark.parametrize(("L", "chunk"), [(30, 8), (32, 8), (70, 4)])  # a partial last chunk; several scan groups
def test_causal_hand_written_backward_matches_autograd(kernel, L, chunk):
    """The positive kernels' causal op has its own backward (ops/causal_backward.py): against autograd through the
    naive reference, with every input transform and right padding."""
    fmap = transformed_fmap(kernel)
    q, k, v = (x.requires_grad_(True) for x in qkv(L=L))
    mask = padding_mask(2, L, left=0, right=5)  # a left-padded causal row has queries that see no key (0/0)
    g = torch.randn(2, 3, L, 5, dtype=D64) * mask[:, None, :, None]
    fast = torch.autograd.grad((favor_causal(q, k, v, fmap, mask, chunk) * g).sum(), (q, k, v))
    slow = torch.autograd.grad((naive_linear_attention(q, k, v, fmap, True, mask) * g).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        assert rel_err(a, b) < 1e-9
    assert torch.equal(fast[1][1, :, -5:], torch.zeros_like(fast[1][1, :, -5:]))  # padded keys: exactly 0


@pytest.mark.parametrize("window", [0, 2])
def test_causal_op_on_the_gpu_scan_form_matches_the_reference(window, monkeypatch):
    """GPUs combine the chunk summaries with the matrix form of the scan (a CPU runs the recurrence up to
    RECURRENCE_MAX chunks, so the other tests take that): the whole causal op on the matrix form, values and
    gradients against autograd through the naive reference, with per-head importance-sampled features, right
    padding, several scan groups and two calls chained by their state."""
    from hf_performer.ops import causal_attention, scan

    class Forbidden:
        @staticmethod
        def apply(*args):
            raise AssertionError("the recurrence ran; the matrix form was wanted")

    monkeypatch.setattr(scan, "RECURRENCE_MAX", 0)
    monkeypatch.setattr(scan, "_Recurrence", Forbidden)
    fmap = transformed_fmap("softmax", batched=True)
    L, cut, chunk = 70, 37, 2  # 35 chunks: 3 groups of 16 in the first call
    q, k, v = (x.requires_grad_(True) for x in qkv(L=L))
    mask = padding_mask(2, L, left=0, right=5)
    g = torch.randn(2, 3, L, 5, dtype=D64) * mask[:, None, :, None]
    part = lambda x, a, b: x[:, :, a:b]  # noqa: E731
    first, state = causal_attention(part(q, 0, cut), part(k, 0, cut), part(v, 0, cut), fmap, mask[:, :cut], chunk,
                                    window)
    second, _ = causal_attention(part(q, cut, L), part(k, cut, L), part(v, cut, L), fmap, mask[:, cut:], chunk,
                                 window, state=state)
    out = torch.cat([first, second], 2)
    ref = naive_linear_attention(q, k, v, fmap, True, mask, local_window=window)
    assert_values_and_gradients(out, ref, (q, k, v), g, mask[:, None, :, None].expand_as(out))


def test_causal_hand_written_backward_through_the_running_state():
    """Gradients reach an incoming FavorState (decoding, CPU segments) and flow through the returned one: two calls
    chained by the state equal one call, in value and gradient, and gradcheck holds for the state's sums."""
    from hf_performer.ops import FavorState, causal_attention
    from hf_performer.ops.causal import _causal

    fmap = transformed_fmap("favor++")
    q, k, v = (x.requires_grad_(True) for x in qkv(L=40))
    g = torch.randn(2, 3, 40, 5, dtype=D64)
    first, state = causal_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17], fmap, None, 8)
    second, last = causal_attention(q[:, :, 17:], k[:, :, 17:], v[:, :, 17:], fmap, None, 8, state=state)
    loss = (torch.cat([first, second], 2) * g).sum() + 0.01 * (last.S.sum() + last.z.sum())
    ref_out, ref_state = _causal(q, k, v, fmap, None, 8, 0, None)  # autograd through the forward, one call
    ref_loss = (ref_out * g).sum() + 0.01 * (ref_state.S.sum() + ref_state.z.sum())
    assert torch.equal(last.c, ref_state.c)  # the same stabiliser, so the sums are comparable
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), torch.autograd.grad(ref_loss, (q, k, v))):
        assert rel_err(a, b) < 1e-10
    fm1 = transformed_fmap("softmax", H=1, m=6)
    small = [x.detach()[:1, :1, :11].requires_grad_(True) for x in (q, k, v)]
    gen = torch.Generator().manual_seed(3)
    S0 = torch.randn(1, 1, 6, 5, generator=gen, dtype=D64, requires_grad=True)
    z0 = torch.rand(1, 1, 6, generator=gen, dtype=D64, requires_grad=True)
    c0 = torch.randn(1, 1, 6, generator=gen, dtype=D64)
    op = lambda q, k, v, S0, z0: causal_attention(q, k, v, fm1, None, 4, state=FavorState(S=S0, z=z0, c=c0))[0]
    assert torch.autograd.gradcheck(op, (*small, S0, z0))


def wide_spread_inputs(L=37, seed=0):
    """q, k with logits spread over tens of nats across features (scale 4 at d = 8), so that a chunk's reference,
    floored at REF_SPREAD below its first key's largest logit, lies above every key seen so far in some features
    (ref_i > M_{i+1}): the case the tame inputs of the other tests never reach."""
    return qkv(L=L, scale=4.0, seed=seed)


def explicit_state_sums(k, v, fmap, c, mask=None):
    """The running sums a FavorState should hold after the keys k [B,H,L,d] and values v [B,H,L,dv]: S = sum_s
    exp(Lg(k_s) - c) v_s^T and z = sum_s exp(Lg(k_s) - c), from the feature map's logits directly (no op)."""
    phi = torch.exp(fmap(k)[0] - c[:, :, None, :])  # [B, H, L, m]
    if mask is not None:
        phi = phi * mask[:, None, :, None]
    return phi.transpose(-1, -2) @ v, phi.sum(2)


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
def test_chained_calls_equal_one_pass_when_logits_spread_widely(kernel, window):
    """The state after a call of several chunks (a prompt longer than the chunk size, a multi-token step from a
    state, every CPU segment but the last) holds the sums relative to the running maximum M_n. It was rescaled from
    the last chunk's incoming sums, whose reference can lie above M_n (REF_SPREAD), with a weight clamped to 1:
    too small, so every later step drifted (generate after a 130-token prompt chose other tokens than a full
    forward). Values, the returned state against the explicit sums, and gradients through the chained calls."""
    from hf_performer.ops import causal_attention
    from hf_performer.ops.causal import _causal

    q, k, v = (x.requires_grad_(True) for x in wide_spread_inputs())
    fmap, mask, chunk, L = fmap_for(kernel), padding_mask(2, 37, left=6, right=0), 4, 37
    internals = {}
    with torch.no_grad():
        _causal(q, k, v, fmap, mask, chunk, 0, None, internals)
    assert (internals["ref"] > internals["M"][:, :, 1:]).any()  # the case that broke: ref_i above M_{i+1}
    g = torch.randn(2, 3, L, 5, dtype=D64) * mask[:, None, :, None]
    full = favor_causal(q, k, v, fmap, mask, chunk, local_window=window)
    state, outs = None, []
    for a, b in [(0, 13), (13, 15), (15, 16), (16, 17), (17, 30), (30, 37)]:  # multi-chunk, multi-token, single
        out, state = causal_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], fmap, mask[:, a:b], chunk, window,
                                      state=state)
        outs.append(out)
        S, z = explicit_state_sums(k[:, :, :b], v[:, :, :b], fmap, state.c, mask[:, :b])
        assert rel_err(state.S, S) < 1e-10 and rel_err(state.z, z) < 1e-10, (a, b)
    assert_values_and_gradients(torch.cat(outs, 2), full, (q, k, v), g, mask[:, None, :, None].expand_as(full))


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("splits", [[(0, 2), (2, 3), (3, 9)], [(0, 1), (1, 5), (5, 6), (6, 7), (7, 9)]])
def test_gradients_through_mixed_one_token_and_chunked_steps(splits, window):
    """favor_step's one-token path (``recurrent._one_token``) followed by a multi-token step from its state: the
    one-token step's running maximum carried autograd (from the new key's logits) while the chunked op takes the
    incoming maximum as a constant, so the key of the one-token step got a wrong gradient (96% off; found by a
    fuzzing helper). The stabilisers are constants everywhere now: gradients equal the one-pass op's."""
    q, k, v = (x.requires_grad_(True) for x in qkv(L=9))
    fmap, mask = fmap_for("softmax"), padding_mask(2, 9, left=1, right=0)
    g = torch.randn(2, 3, 9, 5, dtype=D64) * mask[:, None, :, None]
    full = favor_causal(q, k, v, fmap, mask, 4, local_window=window)
    state, outs = None, []
    for a, b in splits:
        out, state = favor_step(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], fmap, state, mask[:, a:b], chunk_size=4,
                                local_window=window)
        outs.append(out)
    assert_values_and_gradients(torch.cat(outs, 2), full, (q, k, v), g, mask[:, None, :, None].expand_as(full))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 2])
def test_cpu_segments_equal_one_pass_when_logits_spread_widely(causal, window, monkeypatch):
    """test_cpu_segments_equal_one_pass_in_value_and_gradient with logits spread over tens of nats: each causal
    segment starts from the state the one before returns (the case of the test above, on every long CPU input)."""
    from hf_performer.ops import common

    q, k, v = (x.requires_grad_(True) for x in wide_spread_inputs(L=45))
    fmap, mask = fmap_for("softmax"), padding_mask(2, 45, left=3, right=5)
    g = torch.randn(2, 3, 45, 5, dtype=D64) * mask[:, None, :, None]
    op = (lambda: favor_causal(q, k, v, fmap, mask, 4, local_window=window)) if causal else (
        lambda: favor_bidirectional(q, k, v, fmap, mask, local_window=window))
    monkeypatch.setattr(common, "CPU_SEGMENT_BYTES", 1 << 40)  # one pass
    whole = op()
    monkeypatch.setattr(common, "CPU_SEGMENT_BYTES", 2 * 3 * 16 * 8 * 8)  # 8 positions per segment
    monkeypatch.setattr(common, "MIN_CPU_SEGMENT", 1)
    assert_values_and_gradients(op(), whole, (q, k, v), g, mask[:, None, :, None].expand_as(whole))


def log_space_causal_reference(q, k, v, w):
    """Exact value of the causal softmax-FAVOR estimator, computed pair by pair in log space (no stabiliser to get
    wrong): out_t = sum_{s<=t} a_ts v_s / sum_{s<=t} a_ts, log a_ts = logsumexp_f (Lg(q_t)_f + Lg(k_s)_f)."""
    lq = q @ w.T - 0.5 * (q * q).sum(-1, keepdim=True)
    lk = k @ w.T - 0.5 * (k * k).sum(-1, keepdim=True)
    pair = torch.logsumexp(lq[..., :, None, :] + lk[..., None, :, :], -1)
    L = q.shape[2]
    pair = pair.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(pair, -1) @ v


@pytest.mark.parametrize(("seed", "chained"), [(2486, False), (1452, True)])
def test_causal_float32_with_logits_spread_over_hundreds_of_nats(seed, chained):
    """float32 causal FAVOR on inputs whose logits spread over hundreds of nats (scale 8 at d = 8), against the
    float64 log-space value of the same estimator (found by a fuzzing helper):
    * one pass, 3 tokens: the in-chunk decays e^{U_s - U_t} were floored at e^-87 on a CPU instead of falling to
      e^-340, so a far key outweighed the near one (11% off); weights below the floor are now 0;
    * a first token, then a step from its state: the chunk reference sat far below the incoming state's maximum
      (only the chunk's first key floored it), U grew to 222 and the output was 38% off (exactly 0 without the
      CPU's floor, as a GPU computes); REF_SPREAD now floors against the running maximum too."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=D64)  # noqa: E731
    q, k, v = 8.0 * mk(1, 1, 3, 8), 8.0 * mk(1, 1, 3, 8), mk(1, 1, 3, 1)
    w = draw_projection(16, 8, seed=0).float()
    ref = log_space_causal_reference(*(t.float().double() for t in (q, k, v)), w.double())
    x = [t.float() for t in (q, k, v)]
    fmap = FeatureMap("softmax", w)
    if chained:
        first, state = favor_step(*(t[:, :, :1] for t in x), fmap, None)
        out = torch.cat([first, favor_step(*(t[:, :, 1:] for t in x), fmap, state)[0]], 2)
    else:
        out = favor_causal(*x, fmap, None, 64)
    assert rel_err(out.double(), ref) < 1e-5


def test_causal_float32_gradients_stay_finite_when_later_keys_tower_over_the_first():
    """A chunk's reference starts from its first key: a first key far below the later ones in some feature made the
    in-chunk bound U huge, the feature products underflowed and the float32 backward returned NaN (seen with
    calibrated aligned features). The reference now stays within REF_SPREAD of that key's largest logit; float32
    then matches float64."""
    d, L = 8, 40
    w = draw_projection(32, d, seed=1).to(D64)
    u = w[0] / w[0].norm()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, n, generator=g, dtype=D64) for n in (d, d, 4))
    k = 0.5 * k
    k[0, 0, 0] = -12.0 * u  # the first key: far below the others in feature 0
    k[0, 0, 1:] += 10.0 * u  # every later key far above it there
    results = {}
    for dtype in (torch.float32, D64):
        x = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = favor_causal(*x, FeatureMap("softmax", w.to(dtype)), None, 64)
        results[dtype] = [out, *torch.autograd.grad(out.sum(), x)]
    for a, b, tol in zip(*results.values(), (1e-4, 0.15, 1e-4, 1e-4)):
        assert torch.isfinite(a).all()
        assert rel_err(a.double(), b) < tol  # dq is tiny here (~1e-6): float32 rounding of O(1) terms shows


@pytest.mark.parametrize(("causal", "B", "Lq", "Lk"),
                         [(False, 0, 5, 5), (False, 2, 0, 0), (False, 2, 4, 0), (True, 0, 5, 5), (True, 2, 0, 0)])
def test_empty_inputs_give_empty_or_zero_outputs(causal, B, Lq, Lk):
    """An empty batch, no tokens, or (bidirectional) no keys: outputs of the right shape, zeros, and a backward that
    runs; these crashed the CPU segment arithmetic (a zero step, a division by zero; found by a fuzzing helper)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 3, Lq, 8, generator=g, dtype=D64, requires_grad=True)
    k, v = (torch.randn(B, 3, Lk, n, generator=g, dtype=D64, requires_grad=True) for n in (8, 5))
    fmap = fmap_for("softmax")
    out = favor_causal(q, k, v, fmap, None, 4) if causal else favor_bidirectional(q, k, v, fmap)
    assert out.shape == (B, 3, Lq, 5) and not out.any()
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_second_order_gradients_are_refused_not_silently_wrong(causal, window):
    """The positive kernels' backwards are hand-written: differentiated again (create_graph=True: gradient penalties,
    Hessian-vector products) autograd took the forward's saved sums as constants, and d|dq|^2/dq came out wrong
    (norm 1.34 against 0.69 by finite differences; found by a bug-hunt helper). Now one clear error; first-order
    gradients are unchanged (the reference's, through ``naive``)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fmap = FeatureMap("softmax", draw_projection(16, 8, seed=1))
    op = favor_causal if causal else favor_bidirectional
    out = op(q, k, v, fmap, None, local_window=window)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out.square().sum(), q, create_graph=True)
    ref = naive_linear_attention(q, k, v, fmap, causal, None, window)
    first, expected = (torch.autograd.grad(o.square().sum(), q)[0] for o in (op(q, k, v, fmap, None, local_window=window),
                                                                             ref))
    torch.testing.assert_close(first, expected, rtol=1e-8, atol=1e-10)


def test_cpu_segments_are_never_a_few_positions_long(monkeypatch):
    """A large batch of short inputs (B·H in the thousands) got segments of a few positions from the 16 MiB bound
    alone (5 at 256 rows x 12 heads, m = 256), and ran 3-6x slower than in one pass (bug-hunt helper): segments are
    at least MIN_CPU_SEGMENT positions (a multiple of ``multiple``), and such an input of 128 tokens runs in one."""
    from hf_performer.ops import common

    x = torch.empty(256, 12, 0, 1)  # (only the shape's batch and heads and the dtype are read)
    assert common.cpu_segment(x, 128, 256) is None
    assert common.cpu_segment(x, 4096, 256) == common.MIN_CPU_SEGMENT
    assert common.cpu_segment(x, 4096, 256, multiple=96) == 192  # the floor, rounded up to a multiple
    one_row = torch.empty(1, 8, 0, 1)  # long single inputs keep their 16 MiB segments
    assert common.cpu_segment(one_row, 8192, 256) == common.CPU_SEGMENT_BYTES // (8 * 256 * 4)
