"""Local-window attention in banded form: exact softmax on the keys nearest each query, FAVOR on all the others.

    out_i = (sum_{j in W(i)} exp(q_i.k_j) v_j + sum_{j not in W(i)} phi(q_i).phi(k_j) v_j) / (the same with v = 1)

W(i) = {j : |i - j| <= w} (bidirectional) or {j : i - w <= j <= i} (causal); padded keys are in neither sum.
Real checkpoints put much of their attention on neighbouring tokens (positional heads), where a random
feature estimate is weakest; the window takes those pairs exactly.

The FAVOR ops compute their numerator and normaliser over *all* keys in the scale exp(-log_scale_i) of their
stabilisers, and FAVOR's estimate of each window pair in that same scale from the features they already hold
(bidirectional: one product per offset; causal: the band of the intra-chunk matrix). ``combine_window`` then
subtracts those estimates and adds the exact terms. Each of the W = 2w + 1 (causal: w + 1) offsets is one
shifted tensor, so the cost is O(w) batched ops of size [B, H, L] or [B, H, L, d] whatever L, nothing L×L.
Every FAVOR pair term is <= 1 (the op's stabilisers bound it); the exact terms are rescaled per query row by
exp(-s_i), s_i = max(0, largest exact log term), so nothing overflows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..features import FeatureMap
from .common import bounded_exp_, masked_exp_, neg_big, safe_den


def band(m: torch.Tensor, width: int) -> torch.Tensor:
    """[..., C, C + s] -> [..., C, width]: entry (i, j) = m[i, i + j] (width <= s + 1, so i + j < C + s always).
    Row i of the band starts i (C + s + 1) elements into the flattened matrix, so the band is a strided view of m
    (of a contiguous copy when m is not contiguous): no copy, one op (the consumer's reshape or pad copies once)."""
    C, S = m.shape[-2:]
    if width > S - C + 1:
        raise ValueError(f"band: width {width} reaches past the {S} columns of a [{C}, {S}] matrix")
    m = m.contiguous()  # the last row's band ends at (C - 1)(S + 1) + width - 1 <= C S - 1: inside m
    return m.as_strided((*m.shape[:-2], C, width), (*m.stride()[:-2], S + 1, 1))  # (from m's own offset)


def unband(b: torch.Tensor, span: int) -> torch.Tensor:
    """Inverse of ``band``: [..., C, width] -> [..., C, span] with b[i, j] at column i + j, zeros elsewhere."""
    C, width = b.shape[-2:]
    return F.pad(b, (0, span + 1 - width)).flatten(-2)[..., : C * span].unflatten(-1, (C, span))


def exact_base(fmap: FeatureMap, qt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """What turns q'.k' into the log of the exact term in the op's scale: [B, H, T] for transformed queries qt
    [B,H,T,d] and the op's log_scale [B,H,T]. The query features drop their row terms and carry 1/m less than
    the exact kernel (arXiv:2009.14794, eq. 5: phi(x) has a 1/sqrt(m) factor on each side)."""
    return (math.log(fmap.nb_features) - log_scale).sub_(fmap.query_row_terms(qt))


def combine_window(num, den, fav, logits, valid, apply_coef, internals: dict | None = None,
                   factor: torch.Tensor | None = None) -> torch.Tensor:
    """Replace FAVOR's estimate of each window pair by its exact term.

    num [B,H,T,dv], den [B,H,T]: FAVOR's numerator and normaliser over all keys, in the op's scale; fav [B,H,T,W]:
    FAVOR's estimate of each window pair in that scale (0 for padded or missing keys); logits [B,H,T,W]: log of
    the exact terms in that scale; valid [B or 1,1 or H,T,W] bool: the pair's key exists and is real;
    apply_coef(coef [B,H,T,W], start [B,H,T,dv]) -> start + sum_j coef[..., j] * (value of the pair's key at
    column j), [B,H,T,dv] (one fused product where the caller can: ``torch.baddbmm``);
    factor: ``valid`` as 1.0 / 0.0 in the logits' dtype, when the caller has it (else converted here).
    Returns out [B,H,T,dv]. ``internals``: a dict that receives e [B,H,T,W] (the exact terms), g [B,H,T] (the
    per-row rescale), coef = e - g fav, kept [B,H,T] bool (FAVOR's rest was not clamped) and total [B,H,T] (the
    normaliser, before ``safe_den``): what a hand-written backward needs."""
    exact = torch.where(valid, logits, neg_big(logits.dtype))  # masked before the exponential
    s = exact.detach().amax(-1).clamp_min(0)  # [B, H, T]: a per-row constant, cancels in the ratio
    e = masked_exp_(exact - s[..., None], valid if factor is None else factor)  # 0 where the pair is not real
    g = bounded_exp_(s.neg())  # <= 1 (s >= 0)
    coef = e - g[..., None] * fav
    num = apply_coef(coef, g[..., None] * num)
    rest = den - fav.sum(-1)
    total = torch.addcmul(e.sum(-1), g, rest.clamp_min(0))  # sum e + g max(rest, 0)
    if internals is not None:
        internals.update(e=e, g=g, coef=coef, kept=rest >= 0, total=total)  # (clamp_min's gradient passes at 0)
    return num / safe_den(total)[..., None]


def window_block(window: int) -> int:
    """Queries per block of the bidirectional window: the smallest multiple of 8 that is at least 2w, so that the w
    keys on either side of a block lie within its span [block + 2w keys] and the spans of neighbouring blocks overlap
    by 2w <= block rows only. Small blocks waste least ([block, block + 2w] products for 2w + 1 wanted columns):
    at w = 4, block 8 ran the banded products 1.7x faster than block 16 on a CPU."""
    return max(8, -(-2 * window // 8) * 8)


def rows(x: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows start .. start + count - 1 of dim 2 of x [B, H, L, ·] (dim 1 of a mask [B, L]), zero (False) where the
    position is outside 0 .. L - 1: [B, H, count, ·] ([B, count]), a view of x when every row is inside."""
    dim = 1 if x.dim() == 2 else 2
    L = x.shape[dim]
    lo, hi = max(start, 0), min(start + count, L)
    part = x.narrow(dim, lo, max(hi - lo, 0))
    before, after = lo - start, count - (lo - start) - max(hi - lo, 0)
    if not before and not after:
        return part
    pad = (before, after) if dim == 1 else (0, 0, before, after)
    return F.pad(part, pad, value=False if x.dtype == torch.bool else 0.0)


# The banded products below work on a block layout: queries x [B, H, P, ·] and keys y [B, H, P, ·] (contiguous),
# P = n·block, key row i holding the key at (the position of query row i) - w, so that query row i's window is key
# rows i .. i + 2w. Block u of the B·H·n blocks of the flattened rows sees key rows u·block .. u·block + block + 2w
# - 1: an overlapping strided view of y (no copy); the last block of each (b, h) reaches into the next one, so its
# rows are scratch: those results are garbage and coefficients there must be 0. The very last block is skipped.


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, P, C] -> [B·H·P/block - 1, block, C] (a view; the last block dropped)."""
    return x.reshape(-1, block, x.shape[-1])[:-1]


def _key_spans(y: torch.Tensor, block: int, window: int) -> torch.Tensor:
    """[B, H, P, C] -> the key span of every block but the last, [B·H·P/block - 1, block + 2w, C]: an overlapping
    view of y (copied first only when y is not contiguous); needs 2w <= block (``window_block``)."""
    C = y.shape[-1]  # overlapping windows of the flattened rows, block rows apart (unfold: a view, no copy)
    return y.reshape(-1).unfold(0, (block + 2 * window) * C, block * C).view(-1, block + 2 * window, C)


def _unblock(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B·H·n - 1, block, C'] -> [B, H, P, C'] with a zero last block (``like``: any [B, H, P, ·] tensor)."""
    return F.pad(z, (0, 0, 0, 0, 0, 1)).reshape(*like.shape[:-1], z.shape[-1])


def _block_products(a: torch.Tensor, b: torch.Tensor, shape, into: torch.Tensor | None = None) -> torch.Tensor:
    """A [B, H, P, C] (``shape``; ``into``'s storage when given, its content ignored, else fresh) whose blocks but
    the last are a @ b ([B·H·n - 1, block, C]) and whose last block is 0 (no zero fill and copy of the whole)."""
    out = a.new_empty(shape) if into is None else into
    blocks = out.view(-1, a.shape[1], shape[-1])
    blocks[:-1].baddbmm_(a, b, beta=0)
    blocks[-1].zero_()
    return out


def near(x: torch.Tensor, y: torch.Tensor, block: int, window: int) -> torch.Tensor:
    """x_i . y_{i+j} for every query row i and j = 0 .. 2w (key position i - w + j): [B, H, P, 2w + 1], from one
    batched product of each block with its key span ([block, C] @ [C, block + 2w]), nothing L x L."""
    products = torch.bmm(_blocks(x, block), _key_spans(y, block, window).transpose(1, 2))
    return _unblock(band(products, 2 * window + 1), x)


def band_apply(coef: torch.Tensor, y: torch.Tensor, block: int, window: int, out: torch.Tensor | None = None,
               into: torch.Tensor | None = None):
    """sum_j coef[i, j] y_{i+j} [B, H, P, C] for coef [B, H, P, 2w + 1]; added in place to ``out`` when given
    (its last block of rows is left as it is), or written into ``into`` (a contiguous tensor of that shape whose
    content is not needed any more: no fresh allocation)."""
    span = block + 2 * window
    c = unband(_blocks(coef, block), span)  # [n, block, block + 2w]
    ys = _key_spans(y, block, window)
    if out is None:
        return _block_products(c, ys, y.shape, into)
    _blocks(out, block).baddbmm_(c, ys)
    return out


def flip_band(coef: torch.Tensor, window: int) -> torch.Tensor:
    """The band seen from the keys: coef [B, H, P, 2w + 1] (query row i, key row i + j) -> [B, H, P, 2w + 1] whose
    row r, column u holds coef[r + u, 2w - u] (0 past P): the coefficient between key row r + 2w and query row
    r + u. ``band_apply(flip_band(coef), x)`` is then the transposed product sum_i coef[i, j - i] x_i for key row
    j = r + 2w, as one [block, block + 2w] product per block like the forward's (no [block + 2w, block] one).
    One padded copy of coef and a strided view of it: (r, u) sits at (r + u)(2w + 1) + 2w - u = r (2w + 1) + u 2w
    + 2w elements into the padded rows."""
    w2 = 2 * window
    padded = F.pad(coef, (0, 0, 0, w2))  # [B, H, P + 2w, 2w + 1]: fresh and contiguous, offset 0
    return padded.as_strided(coef.shape, (*padded.stride()[:2], w2 + 1, w2), w2)
