"""Random projections and feature maps.

Every projection is drawn on the CPU in float64 from a generator seeded by (seed, layer id, draw
count) alone, so data-parallel ranks draw identical features without communicating and a resumed
run continues the same sequence. Orthogonal blocks come from the QR decomposition of Gaussian d×d
blocks, sign-fixed (Q ← Q·sign(diag R)) so the matrix is a function of the Gaussian draw only.

A feature map returns the features in factored, log-domain form so that the attention ops can
stabilise them without bias:

    phi(x)_j = F(x)_j * exp(Lg(x)_j) / sqrt(m)

``Lg`` ("logits") has shape [..., m] (softmax, favor++) or [..., 1] (trig, relu: one log-scale per
position); ``F`` is ``None`` (all ones: positive kernels) or a bounded factor [..., m].
"""

from __future__ import annotations

import hashlib
import math

import torch

from .settings import PerformerConfig


def derive_seed(seed: int, layer_id: int, draw: int, stream: str = "") -> int:
    """A 63-bit seed that depends on (seed, layer_id, draw, stream) only."""
    digest = hashlib.sha256(f"hf-performer:{seed}:{layer_id}:{draw}{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw_projection(
    nb_rows: int,
    dim: int,
    *,
    orthogonal: bool = True,
    feature_norm: str = "chi",
    seed: int = 0,
    layer_id: int = 0,
    draw: int = 0,
) -> torch.Tensor:
    """Draw the [nb_rows, dim] projection W (float64, CPU). Each row is marginally N(0, I_dim)
    when ``feature_norm == "chi"``; rows within a block of ``dim`` are orthogonal if ``orthogonal``."""
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, layer_id, draw))
    return gaussian_rows(gen, nb_rows, dim, orthogonal=orthogonal, feature_norm=feature_norm)


def gaussian_rows(gen: torch.Generator, nb_rows: int, dim: int, *, orthogonal=True, feature_norm="chi"):
    """[nb_rows, dim] float64 rows from ``gen``: orthogonal blocks (sign-fixed QR) or iid."""
    if orthogonal:
        gaussian = torch.randn(math.ceil(nb_rows / dim), dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)  # one batched QR for all blocks
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        q = q * signs.masked_fill(signs == 0, 1.0)[:, None, :]  # Q <- Q sign(diag R): unique given G
        w = q.transpose(-1, -2).reshape(-1, dim)[:nb_rows]  # rows orthonormal within each block
        if feature_norm == "chi":
            norms = torch.randn(nb_rows, dim, generator=gen, dtype=torch.float64).norm(dim=1)
        else:
            norms = torch.full((nb_rows,), math.sqrt(dim), dtype=torch.float64)
        return w * norms[:, None]
    w = torch.randn(nb_rows, dim, generator=gen, dtype=torch.float64)
    if feature_norm == "sqrt_d":
        w = w / w.norm(dim=1, keepdim=True) * math.sqrt(dim)
    return w


LOG_2PI = math.log(2 * math.pi)


def draw_aligned_projection(centers: torch.Tensor, nb_rows: int, *, width: float, seed: int, layer_id: int, draw: int,
                            orthogonal: bool = True, feature_norm: str = "chi"):
    """Importance-sampled features: rows drawn from a proposal fitted to where q + k falls.

    The softmax kernel is exp(q.k) = E_{w~N(0,I)}[exp(w.(q+k) - |q|^2/2 - |k|^2/2)]; its integrand is
    exp(q.k) N(w; q+k, I), so a proposal concentrated near the q + k of the pairs that carry the
    attention has far lower variance than N(0, I) when |q + k| is large. With w ~ p and per-row weight
    b(w) = (log N(w; 0, I) - log p(w)) / 2 added to both sides' logits, the estimator stays unbiased
    and positive for any p > 0. Here p = (1/n) sum_i N(c_i, width^2 I), a Gaussian mixture on the
    ``centers`` c_i (q + k of attention-weighted pairs). The noise of the rows inside a head is drawn like the
    plain features' (``gaussian_rows``: orthogonal blocks or iid, ``PerformerConfig.orthogonal``); with chi norms
    (the default) each row is still marginally distributed as p, with ``feature_norm="sqrt_d"`` (fixed noise norms)
    it is not, and the estimator is biased as the plain sqrt_d features are.

    centers: [H, n, d] -> (projection [H, nb_rows, d], bias [H, nb_rows]) in float64.
    """
    centers = centers.to(torch.float64).cpu()
    H, n, d = centers.shape
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, layer_id, draw, ":aligned"))
    rows, biases = [], []
    for h in range(H):
        pick = torch.randint(n, (nb_rows,), generator=gen)
        w = centers[h, pick] + width * gaussian_rows(gen, nb_rows, d, orthogonal=orthogonal, feature_norm=feature_norm)
        sq = torch.cdist(w, centers[h]) ** 2  # [rows, n]
        log_p = torch.logsumexp(-sq / (2 * width**2), dim=1) - math.log(n) - 0.5 * d * (LOG_2PI + 2 * math.log(width))
        log_n0 = -0.5 * (w * w).sum(1) - 0.5 * d * LOG_2PI
        rows.append(w)
        biases.append(0.5 * (log_n0 - log_p))
    return torch.stack(rows), torch.stack(biases)


def projection_rows(config: PerformerConfig) -> int:
    """Rows of W: trig features use each row twice (sin and cos)."""
    return config.nb_features // 2 if config.kernel == "trig" else config.nb_features


def oprf_a(rho: torch.Tensor) -> torch.Tensor:
    """Variance-optimal A of positive random features (FAVOR++) for rho = E|x+y|^2 / d.

    With f(w, x) = D exp(A|w|^2 + B w.x - |x|^2/2), B = sqrt(1-4A), D = (1-4A)^(d/4), the estimator is
    unbiased for every A < 1/8; minimising its second moment gives 16 A^2 + (4 rho - 2) A - rho = 0,
    whose admissible root is below. rho = 0 gives A = 0, i.e. FAVOR+.
    """
    rho = rho.clamp_min(0)
    return (1 - 2 * rho - torch.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16


def _broadcast_shape(*shapes) -> tuple:
    """torch.broadcast_shapes for concrete shapes, without its symbolic-shape machinery (~0.2 ms a call, on every
    FAVOR call; the shapes here are always compatible)."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, size in enumerate(s, n - len(s)):
            if size != 1:
                out[i] = size
    return tuple(out)


def _in_place_or_not(x: torch.Tensor, other, op: str) -> torch.Tensor:
    """x (op) other with op in add/sub/mul: in place when the result keeps x's shape (x fresh, held by nothing
    else), else a new tensor. Plain-Python shape check: torch.compile traces it."""
    fits = not isinstance(other, torch.Tensor) or _broadcast_shape(x.shape, other.shape) == tuple(x.shape)
    return getattr(x, op + "_")(other) if fits else getattr(torch, op)(x, other)


class FeatureMap:
    """Feature map of one kernel with a fixed projection (and, for favor++, a fixed A).

    ``projection`` is [rows, d] or batched [*P, rows, d] (P broadcasting against the leading dims of
    x [..., L, d]); ``a`` broadcasts against [B, H, 1, 1] (one value per batch and head, or per head)."""

    def __init__(
        self,
        kernel: str,
        projection: torch.Tensor,
        eps: float = 1e-6,
        a: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        q_scale: torch.Tensor | None = None,
        k_scale: torch.Tensor | None = None,
        k_shift: torch.Tensor | None = None,
    ):
        self.kernel = kernel
        # exact input transforms applied chunk by chunk (no full-length copies of q and k):
        # q' = q * q_scale, k' = k * k_scale - k_shift (broadcasting against [B, H, L, d])
        self.q_scale, self.k_scale, self.k_shift = q_scale, k_scale, k_shift
        self.projection = projection  # [rows, d] or [*P, rows, d]
        self.eps = eps
        self.a = a
        # per-row log weights of importance-sampled rows, [*P, rows] -> [*P, 1, rows] (softmax kernel)
        self.bias = None if bias is None else bias.unsqueeze(-2)
        # [*P, 1, rows] so that it broadcasts against [..., L, rows]
        self.sq_norms = (projection * projection).sum(-1).unsqueeze(-2) if kernel == "favor++" else None

    @property
    def nb_features(self) -> int:
        rows = self.projection.shape[-2]
        return 2 * rows if self.kernel == "trig" else rows

    def transform(self, x: torch.Tensor, query: bool) -> torch.Tensor:
        """The exact input transforms of the fitted statistics: x [..., L, d] (broadcasting against [B, H, L, d])
        -> q' = q * q_scale (``query``) or k' = k * k_scale - k_shift, in x's dtype (x itself when there are none)."""
        if query:
            return x if self.q_scale is None else x * self.q_scale.to(x.dtype)
        if self.k_scale is not None and self.k_shift is not None:  # one pass: -shift + x * scale
            return torch.addcmul(-self.k_shift.to(x.dtype), x, self.k_scale.to(x.dtype))
        if self.k_scale is not None:
            x = x * self.k_scale.to(x.dtype)
        return x if self.k_shift is None else x - self.k_shift.to(x.dtype)

    def __call__(self, x: torch.Tensor, query: bool = False, with_bias: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [..., d] (a query or key, before the input transform) -> (logits [..., m] or [..., 1],
        factor [..., m] or None).

        ``query=True`` applies the query transform and drops the terms that are constant along a row
        (-|x|^2/2 and favor++'s log D): the ops normalise every query row, so they cancel exactly,
        value and gradient alike. ``with_bias``: as in ``logits``."""
        return self.logits(self.transform(x, query), query, with_bias)

    def query_row_terms(self, x: torch.Tensor) -> torch.Tensor:
        """The terms ``__call__(x, query=True)`` drops from every logit of a query row, for the *transformed*
        x [..., d] -> [...]: -|x|^2/2 (softmax), plus favor++'s log D. Positive kernels only."""
        half_sq = -0.5 * (x * x).sum(-1)
        if self.kernel == "softmax":
            return half_sq
        if self.kernel == "favor++":
            a = torch.zeros((), dtype=x.dtype, device=x.device) if self.a is None else self.a.to(x.dtype)
            return half_sq + (0.25 * x.shape[-1] * torch.log(1 - 4 * a)).squeeze(-1)
        raise ValueError(f"kernel {self.kernel!r} has no exponential form (local-window attention needs softmax/favor++).")

    @property
    def exponential(self) -> bool:
        """True for the positive kernels (softmax, favor++): their features are exp(logits), one logit per feature,
        and ``logits_vjp`` gives the gradient of ``__call__``'s logits by hand."""
        return self.kernel in ("softmax", "favor++")

    def logits(self, xt: torch.Tensor, query: bool = False, with_bias: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``__call__`` for rows already through the input transform (``transform(x, query)``): ops that need the
        transformed rows for other terms too (the exact local window) transform them once. ``with_bias=False``
        leaves out the per-feature log weights of importance-sampled rows (``feature_bias``): an op that subtracts
        per-feature stabilisers anyway folds them into those (one pass over [..., L, m] fewer)."""
        return self._logits(xt, drop_row_terms=query, with_bias=with_bias)

    @property
    def feature_bias(self) -> torch.Tensor | None:
        """The per-feature log weights [*P, 1, m] that the softmax logits carry (importance-sampled rows), or None."""
        return self.bias if self.kernel == "softmax" else None

    def logits_vjp(self, x: torch.Tensor, grad: torch.Tensor, query: bool = False, *, xt: torch.Tensor | None = None,
                   grad_xt: torch.Tensor | None = None) -> torch.Tensor:
        """The gradient reaching x [..., L, d] (before the input transform) from ``grad`` [..., L, m], the gradient
        of ``__call__(x, query)``'s logits; positive kernels only. The projection, bias, A and the transforms are
        constants (buffers, never trained), so for the logits s (x' W^T) + const - [keys] |x'|^2 / 2 with
        s = sqrt(1 - 4A) (1 for softmax; arXiv:2205.15317, eq. 8) the gradient is
        s (grad W) - [keys] (sum_f grad) x', times the transform's scale. ``xt``: the transformed x' if the caller
        has it (saves the transform); ``grad_xt`` [..., L, d]: a gradient of x' from other terms (the exact local
        window's), joined before the scale. Returns [..., L, d] in x's dtype."""
        if not self.exponential:
            raise ValueError(f"logits_vjp: kernel {self.kernel!r} has no single-exponential form.")
        w = self.projection.to(grad.dtype)
        grad_w = grad @ w  # [..., L, d], fresh: finished in place where the shapes allow
        if self.kernel == "favor++" and self.a is not None:
            grad_w = _in_place_or_not(grad_w, torch.sqrt(1 - 4 * self.a.to(grad.dtype)), "mul")
        if not query:
            xt = self.transform(x, query) if xt is None else xt
            direct = grad.sum(-1, keepdim=True) * xt
            grad_w = _in_place_or_not(grad_w, direct, "sub")
        if grad_xt is not None:
            grad_w = _in_place_or_not(grad_w, grad_xt, "add")
        scale = self.q_scale if query else self.k_scale
        if scale is not None:
            grad_w = _in_place_or_not(grad_w, scale.to(grad.dtype), "mul")
        if grad_w.shape != x.shape:  # broadcast leading dims (a batched A or projection) summed back
            grad_w = grad_w.sum_to_size(x.shape)
        return grad_w.to(x.dtype)

    def _logits(self, x: torch.Tensor, drop_row_terms: bool, with_bias: bool = True):
        query = drop_row_terms
        w = self.projection.to(x.dtype)
        proj = x @ w.transpose(-1, -2)  # [..., L, rows]; fresh, so the positive kernels finish it in place
        # |x|^2 [..., L, 1]; its half is subtracted with alpha = 0.5 (exact: one kernel fewer than halving first)
        sq = None if query else (x * x).sum(-1, keepdim=True)
        bias = self.bias if with_bias else None
        terms = [t for t in (sq, bias, self.a) if t is not None]
        full = _broadcast_shape(proj.shape, *(t.shape for t in terms))
        if full != tuple(proj.shape):
            proj = proj.expand(full).clone()
        if self.kernel == "softmax":
            logits = proj if query else proj.sub_(sq, alpha=0.5)
            return (logits if bias is None else logits.add_(bias.to(x.dtype))), None
        if self.kernel == "favor++":
            a = torch.zeros((), dtype=x.dtype, device=x.device) if self.a is None else self.a.to(x.dtype)
            one_m4a = 1 - 4 * a
            logits = proj.mul_(torch.sqrt(one_m4a)).add_(a * self.sq_norms.to(x.dtype))
            if query:
                return logits, None
            return logits.sub_(sq, alpha=0.5).add_(0.25 * x.shape[-1] * torch.log(one_m4a)), None
        if self.kernel == "trig":
            logits = torch.zeros_like(proj[..., :1]) if query else 0.5 * sq
            return logits, torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        if self.kernel == "relu":
            return torch.zeros_like(proj[..., :1]), torch.relu(proj) + self.eps
        raise ValueError(f"unknown kernel {self.kernel!r}")

    def features(self, x: torch.Tensor, query: bool = False) -> torch.Tensor:
        """Explicit, unstabilised phi(x') [..., m] of the transformed x (references and statistics;
        may overflow)."""
        logits, factor = self._logits(self.transform(x, query), drop_row_terms=False)
        phi = torch.exp(logits).expand(*logits.shape[:-1], self.nb_features)
        if factor is not None:
            phi = phi * factor
        return phi / math.sqrt(self.nb_features)
