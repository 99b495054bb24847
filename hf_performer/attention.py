"""FavorAttention: the FAVOR+ attention module (buffers, redraw, forward, recurrent step).

    attn = FavorAttention(head_dim=64, config=PerformerConfig(nb_features=256, seed=0))
    out = attn(q, k, v, causal=False, key_padding_mask=mask)   # ≈ softmax(q kᵀ · scale) v

Before the feature map, q and k are scaled by √scale and transformed by two exact identities that
shrink |q + k| (the estimator's variance grows like exp(|q + k|²)):
  * key shift      k ← k − c: adds −q·c to every logit of a query, so softmax is unchanged; the
                   c minimising E|q + k − c|² is E[q] + E[k];
  * balancing      q ← a q, k ← k / a: leaves every q·k unchanged.
Uncalibrated bidirectional attention takes c and a from the sequence itself (real tokens only);
uncalibrated causal attention uses neither (it must not look ahead). ``calibrate_statistics`` stores
per-head statistics measured on real data, used by both modes and by decoding afterwards, and draws
importance-sampled ("aligned") features concentrated where the layer's q + k fall.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .features import (
    FeatureMap,
    derive_seed,
    draw_aligned_projection,
    draw_projection,
    oprf_a,
    projection_rows,
)
from .ops import FavorState, favor_bidirectional, favor_causal, favor_step
from .ops.common import compute_dtype, without_autocast
from .settings import ALIGNED_ESTIMATOR, PerformerConfig

_FP32_BUFFERS = (
    "projection", "key_shift", "log_qk_scale", "oprf_rho", "proposal_centers", "aligned_projection", "aligned_bias",
)
# what a Performer model lists in transformers' ``_keep_in_fp32_modules_strict`` (patterns searched in parameter and
# buffer names): the float buffers by name. "favor" alone also matched ``draw_count`` (int64) and
# ``stats_calibrated`` (bool), which a half-precision ``from_pretrained`` then loaded, and saved back, as float32.
KEEP_IN_FP32 = tuple(rf"favor\.{name}$" for name in _FP32_BUFFERS)
NB_CENTERS = 1024  # q + k pairs kept per head for the importance-sampling proposal
ALIGNED_WIDTH = 1.0  # std of each proposal component (the integrand of one pair is N(q + k, I))
MAX_CALIBRATION_QUERIES = 512  # queries per batch row whose attention is sampled during calibration


_HALF_BUFFERS_WARNED = []  # once per process


def _warn_half_buffers(dtype: torch.dtype) -> None:
    """Warn once that a layer's float32 buffers were cast by something that bypasses ``Module.to`` (which keeps them
    float32, ``FavorAttention._apply``)."""
    if _HALF_BUFFERS_WARNED:
        return
    _HALF_BUFFERS_WARNED.append(dtype)
    from .integration.caller import warn_user  # (the integration package imports this module)

    warn_user(
        f"FAVOR+ buffers (random features, fitted statistics, importance-sampled features) are {dtype} here, cast by "
        "something that bypasses Module.to(), such as FSDP1's MixedPrecision(buffer_dtype=...): the features are "
        "rounded, importance weights no longer match their rows, and redraws are rounded too. Keep them float32: "
        "FSDP2 (fsdp_version 2) leaves buffers alone, or set MixedPrecision(buffer_dtype=torch.float32)."
    )


BUFFER_READERS = {"draw_count": int, "stats_calibrated": bool}  # the 0-d buffers kept as Python state: their reads


def _refresh_after_load(module: FavorAttention, incompatible_keys) -> None:
    """load_state_dict post-hook: ``FavorAttention.refresh_buffer_values``."""
    module.refresh_buffer_values()


class FavorAttention(nn.Module):
    """FAVOR+ attention for one layer.

    Args:
        head_dim: d, the size of each head's query/key vectors.
        config: a PerformerConfig (defaults if None).
        num_heads: heads of the layer (sizes the calibrated per-head statistics; 1 = shared).
        layer_id: distinguishes the layers' random draws (seed, layer_id, draw count).
        cross_attention: the queries belong to another sequence than the keys (encoder-decoder cross-attention):
            the key padding mask then says nothing about which queries are real, so the statistics and the
            calibration's pair sampling take every query. False (self-attention): with as many queries as keys,
            the key padding mask marks the real queries too.
    """

    def __init__(self, head_dim: int, config: PerformerConfig | None = None, num_heads: int = 1, layer_id: int = 0,
                 cross_attention: bool = False):
        super().__init__()
        self.config = PerformerConfig() if config is None else PerformerConfig.from_dict(config)
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim={head_dim!r} is invalid: expected a positive integer.")
        self.head_dim, self.num_heads, self.layer_id = head_dim, num_heads, layer_id
        self.cross_attention = bool(cross_attention)
        f32 = dict(dtype=torch.float32)
        self.register_buffer("projection", self._draw(0).float())
        self.register_buffer("draw_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("key_shift", torch.zeros(num_heads, head_dim, **f32))
        self.register_buffer("log_qk_scale", torch.zeros(num_heads, **f32))
        self.register_buffer("oprf_rho", torch.zeros(num_heads, **f32))
        self.register_buffer("stats_calibrated", torch.zeros((), dtype=torch.bool))
        # see _buffer_value: each 0-d buffer's Python value, and the (identity, version) of the tensor it was read from
        self._buffer_values: dict[str, object] = {}
        self._buffer_seen: dict[str, tuple[int, int]] = {}
        self._remember("draw_count", 0)
        self._remember("stats_calibrated", False)
        # a checkpoint loaded with load_state_dict (Trainer's resume, accelerate's load_state, a plain state dict)
        # writes the buffers in place: read their values at once, before a compiled forward could use stale ones
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._transforms_cache = None  # see _stored_transforms
        # whether a redraw schedule follower (callback, maybe_redraw_features) has seen this layer, and how many
        # training forwards ran before one did (``integration.redraw_notice``)
        self.redraw_followed, self.unfollowed_training_calls = False, 0
        # importance-sampled ("aligned") features, filled by calibrate_statistics
        rows = projection_rows(self.config)
        self.register_buffer("proposal_centers", torch.zeros(num_heads, NB_CENTERS, head_dim, **f32))
        self.register_buffer("aligned_projection", torch.zeros(num_heads, rows, head_dim, **f32))
        self.register_buffer("aligned_bias", torch.zeros(num_heads, rows, **f32))

    # ------------------------------------------------------------------ features
    def _draw(self, draw: int) -> torch.Tensor:
        c = self.config
        return draw_projection(
            projection_rows(c), self.head_dim, orthogonal=c.orthogonal, feature_norm=c.feature_norm,
            seed=c.seed, layer_id=self.layer_id, draw=draw,
        )

    def _buffer_value(self, name: str):
        """The value of the 0-d buffer ``name`` (read by ``BUFFER_READERS[name]``) as Python state.

        Reading a device tensor's value is a host synchronisation, so the value is kept in Python and re-read
        only when the buffer changes (another tensor object, or an in-place write such as a checkpoint load):
        steady-state forwards, backwards, decoding steps and redraw schedules never synchronise. Under
        ``torch.compile`` (compiled code then guards on a plain Python value, not on this module's buffer) and on
        meta tensors, the value last seen in eager mode is used: loads refresh it (``refresh_buffer_values``)."""
        if torch.compiler.is_compiling():
            return self._buffer_values[name]  # (the identities are one module's own: compiled code must not guard on them)
        buf = self._buffers[name]
        if not (buf.is_meta or self._buffer_seen[name] == (id(buf), buf._version)):
            self._remember(name, BUFFER_READERS[name](buf))
        return self._buffer_values[name]

    def refresh_buffer_values(self, names=tuple(BUFFER_READERS)) -> None:
        """Read the 0-d buffers ``names`` (``draw_count``, ``stats_calibrated``) into the Python state ``_buffer_value``
        keeps, now: one host synchronisation each. Eager forwards re-read a changed buffer by themselves, but a
        ``torch.compile``d forward uses the value last seen, so whatever writes these buffers outside this class's
        own methods refreshes them: ``load_state_dict`` (a post-hook), the Performer models' ``from_pretrained``
        and ``broadcast_favor_buffers`` do. Call it after writing them yourself (``buf.copy_``) before compiling."""
        for name in names:
            buf = self._buffers[name]
            if not buf.is_meta:
                self._remember(name, BUFFER_READERS[name](buf))

    def _remember(self, name: str, value) -> None:
        """Record ``value`` as the Python value of the current tensor of buffer ``name`` (its identity and version:
        ``_buffer_value`` re-reads the buffer once either changes)."""
        buf = self._buffers[name]
        self._buffer_seen[name], self._buffer_values[name] = (id(buf), buf._version), value

    @property
    def calibrated(self) -> bool:
        """Whether the statistics step has run (the ``stats_calibrated`` buffer), as Python state
        (``_buffer_value``: no host synchronisation once read)."""
        return self._buffer_value("stats_calibrated")

    @property
    def aligned(self) -> bool:
        """True when this layer uses importance-sampled features (calibrated, positive kernel)."""
        return self.config.estimator(self.calibrated) == ALIGNED_ESTIMATOR

    @torch.no_grad()
    def _draw_aligned(self) -> None:
        c = self.config
        w, b = draw_aligned_projection(
            self.proposal_centers, self.aligned_projection.shape[1], width=ALIGNED_WIDTH,
            seed=c.seed, layer_id=self.layer_id, draw=self.draws, orthogonal=c.orthogonal, feature_norm=c.feature_norm,
        )
        self.aligned_projection.copy_(w.to(self.aligned_projection))
        self.aligned_bias.copy_(b.to(self.aligned_bias))

    @torch.no_grad()
    def rederive_features(self) -> None:
        """Recompute the current draw's features from (seed, layer_id, draw_count) and, for aligned
        features, the stored proposal: restores them exactly (e.g. after loading without them)."""
        self.projection.copy_(self._draw(self.draws).to(self.projection))
        if self.aligned:
            self._draw_aligned()

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw the next features of this layer's sequence (seed, layer_id, draw_count + 1)."""
        draws = self.draws
        self.draw_count += 1
        self._remember("draw_count", draws + 1)
        self.rederive_features()

    @property
    def draws(self) -> int:
        """``draw_count`` as a Python int (``_buffer_value``: a redraw schedule asks after every optimizer step, and
        each read of a GPU tensor would wait for the step's queued work)."""
        return self._buffer_value("draw_count")

    def _apply(self, fn, recurse=True):
        # keep the projection and statistics in float32 when the model is cast to half precision
        keep = {n: self._buffers[n] for n in _FP32_BUFFERS}
        known = {n: self._buffer_values[n] for n, seen in self._buffer_seen.items()
                 if seen == (id(self._buffers[n]), self._buffers[n]._version)}
        super()._apply(fn, recurse)
        for name, value in known.items():  # same value in a new tensor (device/dtype moves): no re-read needed
            self._remember(name, value)
        # a buffer swapped in since last read (accelerate's loaders replace the tensors, then dispatch with .to()):
        # read it now, before a compiled forward could use the stale value
        self.refresh_buffer_values([n for n in BUFFER_READERS if n not in known])
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                ok = old.dtype == torch.float32 and not old.is_meta and not new.is_meta
                self._buffers[name] = old.to(new.device) if ok else new.float()
        return self

    def extra_repr(self) -> str:
        c = self.config
        return f"head_dim={self.head_dim}, nb_features={c.nb_features}, kernel={c.kernel!r}, layer_id={self.layer_id}"

    # ------------------------------------------------------------------ statistics
    def _per_head(self, buf: torch.Tensor, heads: int) -> torch.Tensor:
        if buf.shape[0] != 1 and buf.shape[0] != heads:  # (not `in (1, heads)`: wrong for a symbolic heads)
            raise ValueError(
                f"FavorAttention was built with num_heads={self.num_heads} but got {heads} heads; "
                "build it with the layer's number of heads."
            )
        return buf

    @torch.no_grad()
    @without_autocast  # (float16 statistics overflow for large queries: NaN)
    def _prepare(self, q, k, causal: bool, mask, scale) -> FeatureMap:
        """The feature map, with the exact input transforms q' = q·√scale·a, k' = (k·√scale − c)/a.

        Calibrated layers use their stored per-head statistics (and aligned features) in both modes;
        uncalibrated bidirectional attention measures them on the sequence; uncalibrated causal
        attention uses none (it must not look ahead). The statistics are constants of the estimator
        (its expectation does not depend on them), also in the backward. The transforms run chunk by
        chunk inside the ops, so no transformed copy of q or k is ever materialised."""
        c, H, dt = self.config, q.shape[1], compute_dtype(q.dtype)
        if self.projection.dtype != torch.float32:
            _warn_half_buffers(self.projection.dtype)
        root = math.sqrt(self.head_dim**-0.5 if scale is None else float(scale))
        if self.calibrated:
            transforms, favor_a = self._stored_transforms(H, dt, root)
        elif causal:
            scalar = q.new_full((), root, dtype=dt)  # filled on the device: no copy from the host (a sync on CUDA)
            return self._feature_map(None, dt, q_scale=scalar, k_scale=scalar)
        else:
            qmask = self._query_mask(mask, q, k)
            transforms, favor_a = self._transforms(*self._statistics(q, k, qmask, mask, root, reduce_batch=False), root)
        if self.aligned:
            w = self._per_head(self.aligned_projection, H).to(dt)
            b = self._per_head(self.aligned_bias, H).to(dt)
            return FeatureMap("softmax", w, c.eps, bias=b, **transforms)
        return self._feature_map(favor_a, dt, **transforms)

    def _transforms(self, shift, log_a, rho, root: float):
        """({q_scale, k_scale, k_shift}, favor++'s A or None) from the statistics shift [·, H, 1, d], log_a and rho
        [·, H, 1, 1] (``_statistics``' shapes): q' = q·root·a, k' = (k·root − c)/a, a = e^{log_a}."""
        c = self.config
        a = log_a.exp() if c.balance_qk else torch.ones_like(log_a)
        transforms = dict(q_scale=root * a, k_scale=root / a, k_shift=shift / a if c.center_keys else None)
        return transforms, (oprf_a(rho) if c.kernel == "favor++" else None)

    def _stored_transforms(self, H: int, dt: torch.dtype, root: float):
        """``_transforms`` of the stored statistics, computed once and reused while the statistics buffers stay the
        same tensors at the same version (and H, dtype, scale and the kernel settings do not change): 5 small
        kernels fewer per call (a decoding step launches 29 with them, 34 without). Under ``torch.compile`` they are
        computed in the graph (the cache is not read there: compiled code would guard on it)."""
        bufs = (self.key_shift, self.log_qk_scale, self.oprf_rho)

        def compute():
            shift, log_a, rho = (self._per_head(b, H).to(dt) for b in bufs)  # [H, d], [H], [H]
            return self._transforms(shift[None, :, None, :], log_a[None, :, None, None], rho[None, :, None, None], root)

        if torch.compiler.is_compiling():
            return compute()
        c = self.config
        # (inference mode: tensors made there cannot be saved for a later backward, so they serve only inference)
        key = (H, dt, root, c.balance_qk, c.center_keys, c.kernel, torch.is_inference_mode_enabled(),
               tuple(b._version for b in bufs))
        cached = self._transforms_cache
        if cached is None or cached[0] != key or not all(x is y for x, y in zip(cached[1], bufs)):
            # (the buffers themselves, not their ids: a freed tensor's id can come back)
            self._transforms_cache = cached = (key, bufs, compute())
        return cached[2]

    def _statistics(self, q, k, qmask, kmask, root: float, reduce_batch: bool):
        """Key shift c, log balance factor and favor++ rho of the scaled q·root, k·root, from first and
        second moments (no full-size temporaries). Shapes [B|1, H, 1, d], [B|1, H, 1, 1] × 2.

        c = E[q] + E[k] minimises E|q + k − c|²; a⁴ = E|k − c|² / E|q|² balances the two norms; rho is
        E|a q + (k − c)/a|² / d, the favor++ parameter."""

        dt = compute_dtype(q.dtype)  # float32 for half inputs, else the inputs' own precision

        def moments(x, mask):  # E[x] [B,H,d] and E|x|² [B,H] over real positions
            x = x.to(dt)
            sq = torch.linalg.vector_norm(x, dim=-1) ** 2  # [B, H, L]
            if mask is None:
                w = torch.full((x.shape[0], x.shape[2]), 1.0 / x.shape[2], dtype=dt, device=x.device)
            else:
                w = mask.to(dt) / mask.sum(1, keepdim=True).clamp_min(1)  # [B, L]
            mean, msq = torch.einsum("bhld,bl->bhd", x, w), torch.einsum("bhl,bl->bh", sq, w)
            if reduce_batch:
                rows = torch.ones(x.shape[0], dtype=dt, device=x.device) if mask is None else (mask.sum(1) > 0).to(dt)
                rows = rows / rows.sum().clamp_min(1)
                mean, msq = torch.einsum("bhd,b->hd", mean, rows)[None], torch.einsum("bh,b->h", msq, rows)[None]
            return root * mean, root**2 * msq

        mean_q, mq = moments(q, qmask)
        mean_k, mk = moments(k, kmask)
        shift = mean_q + mean_k if self.config.center_keys else torch.zeros_like(mean_k)
        mk = mk - 2 * (shift * mean_k).sum(-1) + (shift * shift).sum(-1)  # E|k − c|²
        mq, mk = mq.clamp_min(1e-12), mk.clamp_min(1e-12)
        log_a = 0.25 * (mk.log() - mq.log()) if self.config.balance_qk else torch.zeros_like(mq)
        a2 = (2 * log_a).exp()
        rho = (a2 * mq + mk / a2 + 2 * (mean_q * (mean_k - shift)).sum(-1)) / q.shape[-1]
        return shift[:, :, None, :].to(dt), log_a[..., None, None].to(dt), rho[..., None, None].to(dt)

    @torch.no_grad()
    @without_autocast  # (float16 statistics overflow for large queries: NaN)
    def calibrate_statistics(self, q, k, key_padding_mask=None, scale=None, causal: bool = False) -> None:
        """Fit this layer's statistics on q, k [B,H,L,d] of a representative batch (no training).

        Stores the per-head key shift, balance factor and favor++ rho, and (``aligned_features``)
        the q + k of NB_CENTERS pairs sampled in proportion to the exact attention weights, from
        which the features are then drawn by importance sampling. ``causal`` says which attention
        weights to sample. Afterwards both modes and decoding use these statistics."""
        if q.shape[1] != self.num_heads:
            raise ValueError(f"calibrate_statistics got {q.shape[1]} heads; this layer has num_heads={self.num_heads}.")
        mask = self._check_mask(key_padding_mask, k)
        qmask = self._query_mask(mask, q, k)
        root = math.sqrt(self.head_dim**-0.5 if scale is None else float(scale))
        shift, log_a, rho = self._statistics(q, k, qmask, mask, root, reduce_batch=True)
        self.key_shift.copy_(shift.reshape(self.num_heads, -1))
        self.log_qk_scale.copy_(log_a.reshape(self.num_heads))
        self.oprf_rho.copy_(rho.reshape(self.num_heads))
        a = log_a.exp() if self.config.balance_qk else torch.ones_like(log_a)
        ct = compute_dtype(q.dtype)
        q = q.to(ct) * (root * a)
        k = k.to(ct) * (root / a) - (shift / a if self.config.center_keys else 0)
        self.proposal_centers.copy_(self._sample_pair_sums(q, k, qmask, mask, causal).to(self.proposal_centers))
        self.stats_calibrated.fill_(True)
        self._remember("stats_calibrated", True)
        if self.aligned:
            self._draw_aligned()

    def _query_mask(self, mask, q, k):
        """Which queries are real [B, Lq] bool, or None (all): the key padding mask for self-attention (as many
        queries as keys), else None (``cross_attention``: the decoder's padding is not known here)."""
        return mask if (mask is not None and not self.cross_attention and q.shape[2] == k.shape[2]) else None

    def _sample_pair_sums(self, q, k, qmask, kmask, causal) -> torch.Tensor:
        """q + k of NB_CENTERS (query, key) pairs per head, drawn with probability softmax(q.k) / #queries
        (pairs inside the local window excluded). Up to MAX_CALIBRATION_QUERIES query positions are sampled
        among those real in some batch row (qmask [B, Lq] or None: all). Raises ValueError when no sampled query
        sees a real key (nothing to fit the proposal on)."""
        B, H, Lq, _ = q.shape
        Lk = k.shape[2]
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.config.seed, self.layer_id, 0, ":pairs"))
        # (calibration, not a hot path: reading which positions are real is a host synchronisation)
        candidates = torch.arange(Lq) if qmask is None else qmask.any(0).nonzero().flatten().cpu()
        pick = torch.randperm(len(candidates), generator=gen)[:MAX_CALIBRATION_QUERIES]
        rows = candidates[pick].sort().values.to(q.device)
        allowed = torch.ones(len(rows), Lk, dtype=torch.bool, device=q.device)
        qpos, kpos = rows[:, None] + (Lk - Lq), torch.arange(Lk, device=q.device)[None, :]
        if causal:
            allowed = qpos >= kpos
        # pairs inside the local window are computed exactly: the features serve the others (their weight
        # stays their share of the full attention, so mostly-local queries count little)
        far = (qpos - kpos).abs() > self.config.local_window if self.config.local_window else None
        allowed = allowed[None].expand(B, -1, -1)
        if kmask is not None:
            allowed = allowed & kmask[:, None, :]
        centers = []
        for h in range(H):
            qh, kh = q[:, h, rows].float(), k[:, h].float()  # [B, R, d], [B, Lk, d]
            probs = torch.softmax((qh @ kh.transpose(-1, -2)).masked_fill(~allowed, float("-inf")), dim=-1)
            probs = torch.nan_to_num(probs)  # queries that see no key
            if qmask is not None:
                probs = probs * qmask[:, rows, None]
            if far is not None and bool((probs * far).sum() > 0):
                probs = probs * far
            # two stages (a query row by its mass, then a key in it) draw the same pairs as one multinomial over all
            # B·R·Lk pairs, which torch refuses beyond 2^24 categories (e.g. 64 sequences of 512 tokens)
            probs = probs.reshape(-1, Lk).cpu()
            mass = probs.sum(-1)  # [B·R]: each query row's share
            if not bool(mass.sum() > 0):
                raise ValueError(
                    f"calibrate_statistics (layer {self.layer_id}): no real query of the batch sees a real key, so "
                    "there is no attention to fit the features on; pass a batch with real tokens (its "
                    "attention_mask / key_padding_mask marks them with 1)."
                )
            row = torch.multinomial(mass, NB_CENTERS, replacement=True, generator=gen)
            s = torch.multinomial(probs[row], 1, generator=gen).squeeze(-1)
            b, t = row // len(rows), row % len(rows)
            centers.append(qh[b, t] + kh[b, s])
        return torch.stack(centers)

    # ------------------------------------------------------------------ attention
    def _check(self, q, k, v):
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"FavorAttention expects q, k, v as [batch, heads, length, head_dim]; got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}."
            )
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"q/k head_dim {q.shape[-1]}/{k.shape[-1]} != FavorAttention head_dim {self.head_dim}.")
        if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")

    @staticmethod
    def _check_mask(mask, k):
        if mask is None:
            return None
        if mask.dim() != 2 or tuple(mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be [batch, key_length] = {(k.shape[0], k.shape[2])} (True = real token); "
                f"got shape {tuple(mask.shape)}. Performer attention never takes an L×L mask."
            )
        if mask.dtype.is_floating_point:
            raise ValueError("key_padding_mask must be bool or integer (1/True = real token), not floating point.")
        return mask.to(device=k.device, dtype=torch.bool)

    def _feature_map(self, a, dtype, **transforms) -> FeatureMap:
        return FeatureMap(self.config.kernel, self.projection.to(dtype), self.config.eps, a, **transforms)

    def forward(self, q, k, v, causal: bool = False, key_padding_mask=None, scale=None) -> torch.Tensor:
        """q, k [B,H,L,d], v [B,H,L,dv] -> [B,H,Lq,dv] ≈ softmax(q kᵀ·scale) v (scale = d^-1/2 if None).

        key_padding_mask [B, Lk] bool/int (True/1 = real token) or None. Raises ValueError on shape mismatches,
        an L×L or floating-point mask, causal attention with Lq != Lk, or a local window with Lq != Lk."""
        self._check(q, k, v)
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError("causal FavorAttention needs as many queries as keys; use step() to decode.")
        mask = self._check_mask(key_padding_mask, k)
        fmap = self._prepare(q, k, causal, mask, scale)
        window = self.config.local_window
        if causal:
            return favor_causal(q, k, v, fmap, mask, self.config.chunk_size, window)
        return favor_bidirectional(q, k, v, fmap, mask, window)

    def step(self, q, k, v, state: FavorState | None = None, key_padding_mask=None, scale=None):
        """Recurrent decoding: T >= 1 new tokens -> (out [B,H,T,dv], new FavorState). Equals causal
        attention over the whole sequence, position by position."""
        self._check(q, k, v)
        mask = self._check_mask(key_padding_mask, k)
        fmap = self._prepare(q, k, True, mask, scale)
        return favor_step(q, k, v, fmap, state, mask, self.config.chunk_size, self.config.local_window)


def is_favor_attention(module) -> bool:
    """True for a FavorAttention: this package's, or the copy in a saved folder's portable modeling code (a model
    loaded with ``trust_remote_code=True`` before hf_performer was imported holds those; the package's functions
    accept both, since the copy is this module's source)."""
    return isinstance(module, FavorAttention) or (
        type(module).__name__ == "FavorAttention" and callable(getattr(module, "calibrate_statistics", None))
        and callable(getattr(module, "redraw_features", None)))
