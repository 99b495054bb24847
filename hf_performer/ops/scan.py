"""Inter-chunk states of causal FAVOR from stabilised chunk summaries, in a fixed number of batched ops.

A chunk summary is a pair (K, c): the sums K = sum_s exp(Lg(k_s) - c) [v_s, 1] of its keys relative to a
per-feature reference c (c >= every logit it holds, so every term is <= 1). Two summaries combine by

    (K1, c1) (+) (K2, c2) = (K1 e^{c1 - c} + K2 e^{c2 - c}, c = max(c1, c2))

which is associative (the stabiliser of arXiv:2009.14794, sec. 2.3, made exact; see docs/DESIGN.md). The state
entering chunk i, relative to a target reference t_i >= c_j (j < i), is P_i = sum_{j<i} K_j e^{c_j - t_i}; the
backward needs the mirror image, sum_{j>i} (``reverse=True``).

It is computed in two levels (the chunked layout of flash-linear-attention, without its kernels):
* inside groups of up to G consecutive chunks, as one batched matmul per feature with the weights
  e^{c_j - t_i} <= 1 (a [G, G] triangular matrix per group and feature: n·G·m' weights in all, a G/C fraction of
  one [L, m] feature tensor);
* across groups, from the group totals (one extra row of the same matmul's weights: each group's sum relative to its
  largest c) by a Hillis-Steele scan with (+): ceil(log2(n / G)) steps of a fixed number of ops on
  [n / G, m, dv + 1] tensors (none at all up to G chunks); the state entering each group reaches its chunks as one
  rank-1 update per group and feature, in place (no full-size temporaries).
Everything is linear in K with constant weights (the stabilisers cancel in the attention output), so the
backward is autograd's transpose of the same ops. No Python loop over chunks or tokens.

On a CPU, where an op costs microseconds to dispatch but every full-size temporary costs a pass over memory (and
page faults), up to RECURRENCE_MAX chunks are instead combined by the recurrence itself, one chunk at a time, in
place: with R_i = max_{j<=i} c_j (a ``cummax``),

    Q_i = Q_{i-1} e^{R_{i-1} - R_i} + K_i e^{c_i - R_i},    P_{i+1} = Q_i e^{R_i - t_{i+1}}

(every factor <= 1, the same terms as the matrix form: only the rounding differs). That is n small in-place ops on
[..., m, e] tensors instead of a [G, G] weight matrix per feature and two layout copies of K; the CPU ops run
segment by segment (``common.cpu_segment``), so n stays small. Its backward is the mirror recurrence
(sum_{i>j} dP_i e^{c_j - t_i}: references -t, targets -c).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import neg_big, running_max, weights

GROUP = 16  # chunks per group of the in-group matrix form: [G, G] weights per feature and group
RECURRENCE_MAX = 64  # at most this many chunks run as the in-place recurrence on a CPU (see the module docstring)


def _shift(x: torch.Tensor, step: int, dim: int, reverse: bool, value=0.0) -> torch.Tensor:
    """x moved ``step`` places along ``dim`` (towards later positions, or earlier ones when ``reverse``), the
    vacated places filled with ``value``: entry i holds x[i - step] (reverse: x[i + step])."""
    n = x.shape[dim]
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + ([0, step] if reverse else [step, 0])
    return F.pad(x, pad, value=value).narrow(dim, step if reverse else 0, n)


def _scan(K: torch.Tensor, c: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive (+)-scan along dim -3 of K [..., n, m, e] with references c [..., n, m'] (m' = m or 1); from the
    end when ``reverse``."""
    n, step = K.shape[-3], 1
    while step < n:
        # the summary `step` positions back (ahead when reverse); the identity (0, -big) past the end
        K_prev = _shift(K, step, -3, reverse)
        c_prev = _shift(c, step, -2, reverse, value=neg_big(c.dtype))
        c_new = torch.maximum(c, c_prev)
        K = K * weights(c - c_new)[..., None] + K_prev * weights(c_prev - c_new)[..., None]
        c, step = c_new, 2 * step
    return K, c


def _recurrence(K: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, reverse: bool, total: list | None = None
                ) -> torch.Tensor:
    """``exclusive_prefix`` by the in-place recurrence (module docstring), without autograd: n - 1 steps of three
    ops on [..., m, e] slices, in scan order (from the end when ``reverse``), small enough to stay in cache (one op
    per step on the whole [..., n, m, e] tensor measured slower: every full pass over it goes to memory).
    ``total``: a list that receives the sum over all n summaries relative to the largest c, [..., m, e] (one step
    more of the same recurrence)."""
    n = K.shape[-3]
    order = list(range(n - 1, -1, -1)) if reverse else list(range(n))
    with torch.no_grad():
        cs, ts = (x.flip(-2) if reverse else x for x in (c, targets))  # [..., n, m'] in scan order
        R = running_max(cs, -2)  # R_p = max of c over scan positions <= p
        grow = weights(R[..., :-1, :] - R[..., 1:, :])[..., None]  # e^{R_{p-1} - R_p} <= 1: [..., n - 1, m', 1]
        enter = weights(cs - R)[..., None]  # e^{c_p - R_p} <= 1
        reach = weights(R[..., :-1, :] - ts[..., 1:, :])[..., None]  # e^{R_{p-1} - t_p}
        out = torch.empty_like(K)
        out.select(-3, order[0]).zero_()  # nothing comes before the first chunk in scan order
        Q = K.select(-3, order[0]) * enter[..., 0, :, :]  # [..., m, e]
        for p in range(1, n):
            i = order[p]
            if torch.compiler.is_compiling():  # (torch.compile does not trace out= into a strided view)
                out.select(-3, i).copy_(Q * reach[..., p - 1, :, :])
            else:
                torch.mul(Q, reach[..., p - 1, :, :], out=out.select(-3, i))
            if p < n - 1 or total is not None:
                Q.mul_(grow[..., p - 1, :, :]).addcmul_(K.select(-3, i), enter[..., p, :, :])
        if total is not None:
            total.append(Q)
    return out


class _Recurrence(torch.autograd.Function):
    """``_recurrence`` with its transpose as the backward: dK_j = sum_{i after j} dP_i e^{c_j - t_i}, the mirror
    recurrence with references -t and targets -c (itself a ``_Recurrence``, so higher derivatives work too)."""

    @staticmethod
    def forward(ctx, K, c, targets, reverse: bool):
        ctx.save_for_backward(c, targets)
        ctx.reverse = reverse
        return _recurrence(K, c, targets, reverse)

    @staticmethod
    def backward(ctx, dP):
        c, targets = ctx.saved_tensors  # the transpose is a recurrence too: differentiable again, to any order
        return _Recurrence.apply(dP, -targets, -c, not ctx.reverse), None, None, None


def total_summary(K: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_j K_j e^{c_j - max c} [..., m, e]: every summary K [..., n, m, e] relative to the largest of the references
    c [..., n, m'] (weights <= 1; differentiable in K). Without autograd, on a CPU, the recurrence gives it at the
    cost of one more step (``exclusive_prefix(total=...)``); this is the general form (two passes over K)."""
    return (K * weights(c - c.amax(-2, keepdim=True))[..., None]).sum(-3)


def exclusive_prefix(K: torch.Tensor, c: torch.Tensor, targets: torch.Tensor, group: int = GROUP,
                     reverse: bool = False, form: str | None = None, total: list | None = None) -> torch.Tensor:
    """The state entering each chunk: P_i = sum_{j<i} K_j e^{c_j - t_i} (``reverse``: sum_{j>i}).

    K [..., n, m, e] chunk summaries (float32/float64), c [..., n, m'] their references, targets [..., n, m'] with
    t_i >= c_j for every j that reaches i (then every weight is <= 1; m' = m, or 1 for kernels with one log-scale
    per position). ``form``: "matrix" (a fixed number of batched ops: GPUs), "recurrence" (n in-place steps), or
    None: the recurrence on a CPU for n <= RECURRENCE_MAX, else the matrix form. ``group`` G: chunks per group of
    the matrix form (its weights are [n, G, m'] per batch row and head). Differentiable in K; c and targets
    are constants. Returns [..., n, m, e]. ``total`` (not ``reverse``): a list that receives ``total_summary(K, c)``,
    from the recurrence's one more step where it runs without autograd. Raises ValueError for an unknown ``form``."""
    if form not in (None, "matrix", "recurrence"):
        raise ValueError(f"exclusive_prefix: form={form!r}; expected 'matrix', 'recurrence' or None (by device)")
    c, targets = c.detach(), targets.detach()
    n, m, e = K.shape[-3:]
    recurrence = form == "recurrence" or (form is None and K.device.type == "cpu" and n <= RECURRENCE_MAX)
    if total is not None and not (recurrence and n > 1 and not reverse and not (torch.is_grad_enabled()
                                                                                and K.requires_grad)):
        total.append(total_summary(K, c))  # (the recurrence below gives it otherwise)
        total = None
    if n == 1:  # one chunk (short inputs, a decoding step): nothing comes before it
        return torch.zeros_like(K)
    if recurrence and total is not None:  # no autograd here: the recurrence itself, with its one more step
        return _recurrence(K, c, targets, reverse, total)
    if recurrence:
        return _Recurrence.apply(K, c, targets, reverse)
    G = min(n, group)
    ng = -(-n // G)
    pad = ng * G - n
    if pad:  # empty summaries; their outputs are cut off (targets +big: weights 0, never inf)
        K = F.pad(K, (0, 0, 0, 0, 0, pad))
        c = F.pad(c, (0, 0, 0, pad), value=neg_big(c.dtype))
        targets = F.pad(targets, (0, 0, 0, pad), value=-neg_big(c.dtype))
    lead = K.shape[:-3]
    Kg = K.unflatten(-3, (ng, G)).movedim(-2, -3)  # [..., ng, m, G, e] (a view)
    cg, tg = c.unflatten(-2, (ng, G)).transpose(-1, -2), targets.unflatten(-2, (ng, G)).transpose(-1, -2)
    with torch.no_grad():  # cg, tg: [..., ng, m', G]
        w = weights(cg[..., None, :] - tg[..., :, None])  # [..., ng, m', G(i), G(j)]
        w = w.triu_(1) if reverse else w.tril_(-1)  # [i, j]: only a chunk j after i (reverse) / before i reaches i
        if ng > 1:  # one more row: each group's total relative to its reference (its largest c)
            ref = cg.amax(-1)  # [..., ng, m']
            w = torch.cat([w, weights(cg - ref[..., None])[..., None, :]], -2)  # [..., ng, m', G + 1, G]
    local = w @ Kg  # [..., ng, m, G (+ 1), e]: the chunks of the same group that reach each one (and the total)
    if ng > 1:
        inclusive, inc_ref = _scan(local[..., G, :], ref, reverse)  # [..., ng, m, e]
        into = _shift(inclusive, 1, -3, reverse)  # the groups before g (after g when reverse)
        into_ref = _shift(inc_ref, 1, -2, reverse, value=neg_big(c.dtype))
        with torch.no_grad():
            scale = weights(into_ref[..., None] - tg).expand(*lead, ng, m, G)  # [..., ng, m, G]
        # local += scale (x) into, as one rank-1 update per (group, feature) in place (no full-size temporaries)
        local = local[..., :G, :]
        local.view(-1, G, e).baddbmm_(scale.reshape(-1, G, 1), into.reshape(-1, 1, e))
    # contiguous once here, not in each consumer's matmul (with one group reshape alone would return a view)
    return local.movedim(-3, -2).reshape(*lead, ng * G, m, e)[..., :n, :, :].contiguous()
