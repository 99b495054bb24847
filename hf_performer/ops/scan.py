"""Log-depth scan of stabilised chunk summaries: the inter-chunk states of causal FAVOR.

A chunk summary is a pair (K, c): the sums K = sum_s exp(Lg(k_s) - c) [v_s, 1] of its keys relative to a
per-feature reference c (c >= every logit it holds, so every term is <= 1). Two summaries combine by

    (K1, c1) (+) (K2, c2) = (K1 e^{c1 - c} + K2 e^{c2 - c}, c = max(c1, c2))

which is associative (Performer paper, arXiv:2009.14794, sec. 2.3 with the stabiliser of the README), so
all prefixes come from a Hillis-Steele scan in ceil(log2 n) steps of a fixed number of batched ops,
independent of the sequence length (flash-linear-attention's chunked layout, without its kernels).

``exclusive_prefix`` returns the state entering every chunk i, expressed relative to a target reference
t_i >= c_j (j < i): P_i = sum_{j<i} K_j e^{c_j - t_i}. Its backward is the same scan run in reverse over
the incoming gradients; it keeps only the references (the op is linear in K), nothing of size K.
"""

from __future__ import annotations

import torch

from .common import neg_big


def _scan(K: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan along dim -3 of K [..., n, m, e] with references c [..., n, m'] (m' = m or 1)."""
    n, step = K.shape[-3], 1
    while step < n:
        # the summary `step` chunks back (the identity (0, -big) before the start)
        K_prev = torch.nn.functional.pad(K, (0, 0, 0, 0, step, 0))[..., :n, :, :]
        c_prev = torch.nn.functional.pad(c, (0, 0, step, 0), value=neg_big(c.dtype))[..., :n, :]
        c_new = torch.maximum(c, c_prev)
        K = K * torch.exp(c - c_new)[..., None] + K_prev * torch.exp(c_prev - c_new)[..., None]
        c, step = c_new, 2 * step
    return K, c


def _exclusive(K, c, targets, reverse: bool) -> torch.Tensor:
    """P_i = sum_{j<i} K_j e^{c_j - t_i} (reverse: sum_{j>i} K_j e^{t_i - c_j}, references that decrease)."""
    if reverse:  # a suffix scan is a prefix scan of the flipped sequence with negated references
        return _exclusive(K.flip(-3), -c.flip(-2), -targets.flip(-2), False).flip(-3)
    inclusive, ref = _scan(K, c)
    # shift by one chunk: the state entering chunk i holds chunks < i
    K_in = torch.nn.functional.pad(inclusive, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]
    ref_in = torch.nn.functional.pad(ref, (0, 0, 1, 0), value=neg_big(ref.dtype))[..., :-1, :]
    return K_in * torch.exp(ref_in - targets)[..., None]


class _ExclusivePrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, K, c, targets):
        ctx.save_for_backward(c, targets)
        return _exclusive(K, c, targets, reverse=False)

    @staticmethod
    def backward(ctx, grad):
        c, targets = ctx.saved_tensors
        # dK_j = sum_{i>j} dP_i e^{c_j - t_i}: the reverse scan of the gradients, with roles of c and t swapped
        return _exclusive(grad, targets, c, reverse=True), None, None


def exclusive_prefix(K: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The state entering each chunk: P_i = sum_{j<i} K_j e^{c_j - t_i}.

    K [..., n, m, e] chunk summaries (float32/float64), c [..., n, m'] their references, targets [..., n, m'] with
    t_i >= c_j for all j < i (then every factor is <= 1). Differentiable in K (c and targets are constants: the
    stabilisers cancel in the attention output). Returns [..., n, m, e]; ceil(log2 n) steps of batched ops."""
    return _ExclusivePrefix.apply(K, c.detach(), targets.detach())
