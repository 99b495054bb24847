"""Pieces shared by the FAVOR ops: compute dtype, the running state and its key update."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch

from ..features import FeatureMap

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


def safe_den(den: torch.Tensor) -> torch.Tensor:
    """Guard a normaliser that underflowed to exactly 0 (no real key seen): the output becomes 0."""
    return torch.where(den == 0, torch.ones_like(den), den)


def chunks(length: int, size: int):
    for start in range(0, length, size):
        yield start, min(start + size, length)


@dataclass
class FavorState:
    """Running FAVOR sums of one layer, per batch row and head (constant size in the length).

    S: [B, H, m, dv] sum_s phi~(k_s) v_s^T; z: [B, H, m] sum_s phi~(k_s); c: [B, H, m'] the
    per-feature stabiliser (m' = m, or 1 for trig/relu): phi~(k) = F(k) exp(Lg(k) - c).
    With local-window attention (w > 0) it also keeps the last w keys and values, as they reach the op,
    and their padding mask (1.0 = real): wk [B, H, w', d], wv [B, H, w', dv], wm [B, w'], w' <= w.
    """

    S: torch.Tensor
    z: torch.Tensor
    c: torch.Tensor
    wk: torch.Tensor | None = None
    wv: torch.Tensor | None = None
    wm: torch.Tensor | None = None

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

    def rescaled(self, c_new: torch.Tensor) -> FavorState:
        """The same sums expressed relative to a larger stabiliser c_new >= c."""
        factor = torch.exp(self.c - c_new)  # [B, H, m'] <= 1
        return replace(self, S=self.S * factor[..., None], z=self.z * factor, c=c_new)

    @property
    def nbytes(self) -> int:
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def masked_logits(logits: torch.Tensor, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    """logits [B, H, L, m']; mask [B, L] bool (True = real) -> padded rows filled."""
    if mask is None:
        return logits
    return logits.masked_fill(~mask[:, None, :, None], fill)


def key_features(logits, factor, c, mask):
    """phi~(k) = F exp(Lg - c) with padded keys set to exactly 0. logits [B,H,C,m'], c [B,H,1,m']."""
    phi = torch.exp(logits - c)
    if factor is not None:
        phi = phi * factor
    if mask is not None:
        phi = phi.masked_fill(~mask[:, None, :, None], 0.0)
    return phi


def query_features(logits, factor, c):
    """phi~(q) = F exp(Lg + c - r), r the row maximum (cancels in the normalisation). Returns (phi, r)."""
    shifted = logits + c
    r = shifted.amax(dim=-1, keepdim=True)
    phi = torch.exp(shifted - r)
    if factor is not None:
        phi = phi * factor
    return phi, r


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., dv] -> [..., dv + 1]: one matmul then yields a numerator and its normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def read_state(phi_q: torch.Tensor, state: FavorState) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi_q S [.., C, dv], phi_q z [.., C]) with a single matmul."""
    out = phi_q @ torch.cat([state.S, state.z[..., None]], dim=-1)
    return out[..., :-1], out[..., -1]


def absorb(state: FavorState, logits, factor, v1: torch.Tensor, mask) -> FavorState:
    """Add keys (given by their feature logits/factor [B,H,C,m']) and values with a ones column,
    v1 = with_ones(v) [B,H,C,dv+1], to the running sums, raising the per-feature stabiliser c to the
    keys' maximum first."""
    chunk_max = masked_logits(logits, mask, neg_big(logits.dtype)).amax(dim=2)  # [B, H, m']
    state = state.rescaled(torch.maximum(state.c, chunk_max))
    phi = key_features(logits, factor, state.c[:, :, None, :], mask)  # [B, H, C, m]
    inc = phi.transpose(-1, -2) @ v1  # [B, H, m, dv + 1]
    return replace(state, S=state.S + inc[..., :-1], z=state.z + inc[..., -1])


def absorb_keys(state: FavorState, fmap: FeatureMap, k: torch.Tensor, v: torch.Tensor, mask) -> FavorState:
    """absorb() for raw keys k [B,H,C,d]."""
    return absorb(state, *fmap(k), with_ones(v), mask)
