"""Pieces shared by the FAVOR ops: compute dtype, stabiliser helpers, recomputation, the running state."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Features and running sums accumulate in float32 for half inputs, else in the input dtype."""
    return torch.float32 if dtype in HALF else dtype


def neg_big(dtype: torch.dtype) -> float:
    """A finite stand-in for -inf (keeps exp(c - c') free of inf - inf)."""
    return torch.finfo(dtype).min / 4


def no_autocast(device: torch.device):
    """Run the op body without autocast: exponentials and sums stay in the compute dtype."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def without_autocast(fn):
    """Decorate a method (``self`` or ``ctx`` first) to run without autocast on the device of its first tensor
    argument. For an autograd.Function's ``backward`` whose forward runs under ``no_autocast``: a backward called
    inside an autocast region runs in that region's autocast state (autograd hands the caller's state to the
    backward), which would make its products half precision and mix dtypes in its in-place ones (``baddbmm_``: an
    error). For ``FavorAttention``'s statistics: moments and products of q and k, which float16 would overflow."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        with contextlib.nullcontext() if device is None else no_autocast(device):
            return fn(first, *args, **kwargs)

    return run


def first_order_only(backward):
    """Decorate a hand-written ``backward`` (``ctx`` first) that gives first-order gradients only: asked for a
    differentiable gradient (``create_graph=True``, which autograd signals by running the backward in grad mode:
    gradient penalties, Hessian-vector products, MAML), it raises a RuntimeError saying so, before anything is
    computed. Without the check autograd would differentiate the backward's own arithmetic, with the tensors the
    forward saved (sums, normalisers, stabilisers) as constants: second-order gradients silently wrong. (torch's
    ``once_differentiable`` defers that error to the second backward, where ``torch.autograd.grad`` reports a
    disconnected graph instead.)"""

    @functools.wraps(backward)
    def run(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "Performer FAVOR+ attention has first-order gradients only: its backward is hand-written, so a "
                "gradient computed with create_graph=True (gradient penalties, Hessian-vector products, "
                "double backward) cannot be differentiated again. Compute such terms with the unconverted (softmax) "
                "model, or without create_graph.")
        return backward(ctx, *grads)

    return run


def empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The output [B,H,Lq,dv] (zeros, in v's dtype, connected to q, k, v for autograd) when there is nothing to
    attend with or to: an empty batch, no queries or no keys (a query without keys gets 0, like one whose keys
    are all padding); None otherwise. The ops' segment arithmetic assumes at least one row and one key."""
    if q.numel() and k.shape[2]:
        return None
    B, H, L = q.shape[:3]
    return v.new_zeros(B, H, L, v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum()).to(v.dtype)


def safe_den(den: torch.Tensor) -> torch.Tensor:
    """Guard a normaliser that underflowed to exactly 0 (no real key seen): the output becomes 0. (``masked_fill``:
    two kernels, where ``torch.where`` with a Python scalar launches a third to make the scalar a tensor.)"""
    return den.masked_fill(den == 0, 1.0)


@dataclass
class FavorState:
    """Running FAVOR sums of one layer, per batch row and head (constant size in the length).

    S: [B, H, m, dv] sum_s phi~(k_s) v_s^T; z: [B, H, m] sum_s phi~(k_s); c: [B, H, m'] the
    per-feature stabiliser (m' = m, or 1 for trig/relu): phi~(k) = F(k) exp(Lg(k) - c).
    With local-window attention (w > 0) it also keeps the last w keys and values, as they reach the op,
    and their padding mask (1.0 = real): wk [B, H, w', d], wv [B, H, w', dv], wm [B, w'], w' <= w.
    n: [B] int64, the real (unpadded) tokens absorbed per batch row, or None: kept by the cache layer
    (``integration.cache.FavorCacheLayer``) so a later call's mask can be checked against what the sums hold; the
    ops neither read nor return it.
    """

    S: torch.Tensor
    z: torch.Tensor
    c: torch.Tensor
    wk: torch.Tensor | None = None
    wv: torch.Tensor | None = None
    wm: torch.Tensor | None = None
    n: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch: int, heads: int, nb_features: int, c_width: int, dv: int, dtype, device):
        return cls(
            S=torch.zeros(batch, heads, nb_features, dv, dtype=dtype, device=device),
            z=torch.zeros(batch, heads, nb_features, dtype=dtype, device=device),
            c=torch.full((batch, heads, c_width), neg_big(dtype), dtype=dtype, device=device),
        )

    def _map(self, fn) -> FavorState:
        """fn applied to every tensor field (window fields too, when present)."""
        return FavorState(**{f.name: None if (t := getattr(self, f.name)) is None else fn(t) for f in fields(self)})

    def index_select(self, index: torch.Tensor) -> FavorState:
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> FavorState:
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, *args, **kwargs) -> FavorState:
        return self._map(lambda t: t.to(*args, **kwargs))

    def clone(self) -> FavorState:
        """A copy whose tensors each own contiguous storage (none is a view of another's)."""
        return self._map(lambda t: t.clone(memory_format=torch.contiguous_format))

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The fields that are set (S, z, c, and the window's when present)."""
        return [t for t in (getattr(self, f.name) for f in fields(self)) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def masked_exp_(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """exp(x) where ``keep``, exactly 0 elsewhere. x [..., m]: freshly computed, finite and held by nothing else (it
    is exponentiated in place: one tensor instead of two; autograd keeps the result, all exp's backward needs);
    keep: broadcastable bool or None.

    A dropped entry never reaches exp() with its own value: it is multiplied by 0 first (so neither its value nor
    its gradient, 0 * inf = NaN, can leak, whatever placeholder stabiliser it was paired with) and its result (1) by 0
    after. A placeholder of -big would give exp() = 0 in one pass fewer, but on a CPU ``torch.exp`` takes a slow path
    for every argument whose result underflows (below about -87.3 in float32) or overflows: measured 18-60x slower
    per element, so a batch with 25% padding ran the whole attention op 1.35-1.7x slower than with this. (A float
    0/1 factor, not ``masked_fill_``: with a [B, 1, L, 1] mask broadcast over [B, H, L, m] the fill ran 3x slower.)"""
    if keep is None:
        return bounded_exp_(x)
    factor = keep.to(x.dtype)
    x = bounded_exp_(x.mul_(factor))
    if torch.is_grad_enabled() and x.requires_grad:  # out of place: exp_'s saved result stays as it is
        return x * factor
    return x.mul_(factor)


def bounded_exp_(x: torch.Tensor) -> torch.Tensor:
    """exp(x) in place, for the features (x <= 0 after their stabilisers): on a CPU x is first clamped below at
    ``exp_floor`` (-87 in float32), where torch.exp leaves its fast path (``masked_exp_``). A feature below
    e^-87 ~ 1.6e-38 becomes e^-87, an absolute change below 2e-38 next to the stabilised maximum 1; real checkpoints
    do produce such arguments (the first layer of all-MiniLM-L6-v2 on 2k tokens: 3% of them, down to -242), and the
    clamp costs one pass. Other devices compute exp on its fast path everywhere: no clamp."""
    if x.device.type == "cpu":
        x = x.clamp_min_(exp_floor(x.dtype))
    return x.exp_()


def weights(log_w: torch.Tensor) -> torch.Tensor:
    """e^{min(log_w, 0)}: the stabilisers' rescaling weights (<= 1) from their logs (differences of stabilisers), a
    fresh tensor (small: [.., n, m] or [.., C, C]). On a CPU the logs are clamped below at ``exp_floor``
    (``bounded_exp_``: a -big placeholder reference, or a spread of hundreds of nats, would take torch.exp's slow
    path), and the weights whose logs lie below it are then 0, as the exponential would give (two kernels): e^-87 in
    place of e^-340 let a far key outweigh the near ones where every term of a float32 row was that small (in-chunk
    decays of widely spread logits; found by a fuzzing helper)."""
    w = bounded_exp_(log_w.clamp_max(0))
    if w.device.type == "cpu":
        w.masked_fill_(log_w < exp_floor(log_w.dtype), 0.0)
    return w


def exp_floor(dtype: torch.dtype) -> float:
    """The log of the smallest normal number of ``dtype`` rounded up to an integer (-87 in float32, -708 in
    float64): torch.exp computes every argument at or above it on its fast path on a CPU (``masked_exp_``)."""
    return float(math.ceil(math.log(torch.finfo(dtype).tiny)))


def mask_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``keep`` (bool), -big elsewhere, in ``dtype`` (the shape of keep): x + mask_bias(keep) keeps x exactly
    and pushes dropped entries below every real one (for a maximum over the real entries), as one in-place add
    instead of a fill (``masked_exp_``: 3x faster with a broadcast mask)."""
    return (~keep).to(dtype) * neg_big(dtype)


def running_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.cummax(x, dim).values``, taken along the last dimension of a transposed view: on a CPU the cumulative
    maximum along an inner dimension of [B, H, n, m] stabilisers ran 1.6-1.8x slower than along the last one. The
    result is made contiguous again (it is small): a transposed stabiliser broadcast over [L, m] features would
    take the ops' strided, unvectorised path."""
    return torch.cummax(x.transpose(dim, -1), -1).values.transpose(dim, -1).contiguous()


def times(phi: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """phi * factor (the bounded factor F of trig/relu features), or phi when F is None."""
    return phi if factor is None else phi * factor


def pad_len(x: torch.Tensor, before: int, after: int, value=0.0) -> torch.Tensor:
    """Pad dim 2 of [B, H, L, ·] (or dim 1 of a [B, L] mask) with ``before`` / ``after`` entries of ``value``."""
    if x.dim() == 2:
        return F.pad(x, (before, after), value=value)
    return F.pad(x, (0, 0, before, after), value=value)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., dv] -> [..., dv + 1]: one matmul then yields a numerator and its normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def fold_bias(fmap, c: torch.Tensor, query: bool) -> torch.Tensor:
    """c - b (keys) or c + b (``query``): a per-feature key stabiliser c [B, H, 1, m'] as the ops subtract it from key
    logits or add it to query logits computed without the feature map's per-feature log weights b [*P, 1, m]
    (``feature_bias``, the importance-sampled rows' weights: ``FeatureMap.logits(with_bias=False)``); c itself when
    there are none (one small op for the side asked, none for the other).
    exp(lk + b - c) = exp(lk - (c - b)) and exp(lq + b + c - r) = exp(lq + (c + b) - r): b joins the small
    stabiliser instead of costing a pass over each [B, H, L, m] logit tensor. (A maximum of the true key logits
    over rows is the maximum of the unbiased ones plus b: b is constant along the rows.)"""
    b = fmap.feature_bias
    if b is None:
        return c
    return c + b.to(c.dtype) if query else c - b.to(c.dtype)


def with_feature_bias(fmap, top: torch.Tensor) -> torch.Tensor:
    """top + b: the maximum over rows of the true key logits from that of logits computed without the per-feature
    log weights b (``fold_bias``; b is constant along the rows, so the maximum moves by b exactly); top itself when
    the feature map has no such weights. top: [B, H, 1 or n, m'] (bidirectional: over all rows; causal: per chunk)."""
    b = fmap.feature_bias
    return top if b is None else top + b.to(top.dtype)


def finite_reference(c: torch.Tensor) -> torch.Tensor:
    """A stabiliser that saw no real key (still the -big placeholder) becomes 0: every key it scales is
    padding (features exactly 0), and queries then see finite logits instead of -big cancellations."""
    return c.masked_fill(c <= neg_big(c.dtype) / 2, 0.0)  # (two kernels: ``safe_den``)


CPU_SEGMENT_BYTES = 16 << 20  # largest [B, H, S, m] feature tensor per segment of a long input on a CPU
MIN_CPU_SEGMENT = 128  # positions: the shortest CPU segment (see cpu_segment)


def cpu_segment(x: torch.Tensor, length: int, nb_features: int, multiple: int = 1) -> int | None:
    """Positions per segment when a CPU op should run over segments of a long input, else None.

    On a CPU, glibc serves every allocation above its mmap threshold (at most 32 MiB) with fresh pages, so each
    full-length [B, H, L, m] feature tensor costs page faults on every call: at 8k tokens and 8 heads the one-pass
    ops ran 2x slower than over segments. Segments keep each tensor within CPU_SEGMENT_BYTES (a multiple of
    ``multiple`` positions), but are never shorter than MIN_CPU_SEGMENT positions: a large batch of short inputs
    (B·H in the thousands) would otherwise get segments of a few positions, whose per-(row, head) products of a few
    rows ran 3-6x slower than one pass (256 rows of 128 tokens, 12 heads: 6.8 s against 1.9 s forward + backward).
    Other devices (GPUs) always run the whole length in one pass. x: [B, H, L, ·]."""
    if x.device.type != "cpu":
        return None
    per_position = x.shape[0] * x.shape[1] * nb_features * torch.finfo(compute_dtype(x.dtype)).bits // 8
    floor = -(-MIN_CPU_SEGMENT // multiple) * multiple  # (a multiple of ``multiple`` too)
    seg = max(floor, CPU_SEGMENT_BYTES // per_position // multiple * multiple)
    return seg if seg < length else None


def spans(length: int, seg: int | None) -> list[tuple[int, int]]:
    """[(start, stop)] covering ``length`` positions by ``seg`` (one span when seg is None: GPUs)."""
    seg = seg or length
    return [(a, min(a + seg, length)) for a in range(0, length, seg)]


def cat_len(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-segment results joined along the length, dim 2 (no copy for a single segment)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


RECOMPUTE_ABOVE = 1 << 22  # B·H·L·m above which an op's graph is recomputed in the backward instead of kept


def maybe_checkpoint(fn, *args, size: int):
    """fn(*args), recomputed in the backward (torch.utils.checkpoint) when a gradient is needed and the graph
    it would keep (a few [B, H, L, m] feature tensors; ``size`` = B·H·L·m) exceeds RECOMPUTE_ABOVE: then the op
    keeps only its inputs, like a hand-written backward would, at the price of a second forward."""
    needs_grad = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    if needs_grad and size > RECOMPUTE_ABOVE:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
