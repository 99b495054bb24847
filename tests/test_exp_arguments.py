"""Padding, the window's edges and the CPU segments never hand torch.exp an argument outside its fast range.

On a CPU ``torch.exp`` takes a slow path for every argument whose result underflows (below log(tiny) = -87.3 in
float32) or overflows (above 88.7): 18-60x slower per element. The ops once masked dropped keys with a -big
placeholder before the exponential, which made a batch with 25% padding 1.3-1.75x slower than the same batch
without a mask (``common.masked_exp_``), and real checkpoints' keys of large norm put feature logits hundreds of
nats below their stabilisers (``common.bounded_exp_``). Structural check, no timing: every exponential of a per-token
tensor (at least B·H·L elements) in forward and backward gets arguments inside that range: with padding on inputs of
moderate size (so that only masking could push them out), and with keys of large norm."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_performer import FavorAttention, PerformerConfig
from hf_performer.features import FeatureMap, draw_projection
from hf_performer.ops import common, favor_bidirectional, favor_causal, naive_linear_attention

EXP = {torch.ops.aten.exp.default, torch.ops.aten.exp_.default, torch.ops.aten.exp.out}
LOW, HIGH = math.log(torch.finfo(torch.float32).tiny), math.log(torch.finfo(torch.float32).max)


class ExpArguments(TorchDispatchMode):
    """Records (min, max) of the argument of every exponential of at least ``size`` elements inside the block."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.ranges = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in EXP and args[0].numel() >= self.size:
            self.ranges.append((args[0].min().item(), args[0].max().item(), tuple(args[0].shape)))
        return func(*args, **(kwargs or {}))


def padding(kind: str, B: int, L: int):
    lengths = torch.tensor([L, L - 7, L // 2])[:B]
    pos = torch.arange(L)[None]
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "left":
        return pos >= (L - lengths)[:, None]
    return None


@pytest.mark.parametrize("segment", [None, 40], ids=["one-pass", "cpu-segments"])
@pytest.mark.parametrize("kind", ["right", "left", "none"])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_exponentials_stay_in_range_with_padding(causal, window, kind, segment, monkeypatch):
    if segment:  # segments of 40 positions (B·H·m·4 bytes each) instead of the 16 MiB default
        monkeypatch.setattr(common, "CPU_SEGMENT_BYTES", 40 * 3 * 2 * 32 * 4)
        monkeypatch.setattr(common, "MIN_CPU_SEGMENT", 1)
    B, H, L, d = 3, 2, 100, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(B, H, L, d, generator=g) for _ in range(3))
    att = FavorAttention(d, PerformerConfig(nb_features=32, local_window=window, chunk_size=16), num_heads=H)
    att.calibrate_statistics(q, k, causal=causal)
    mask = padding(kind, B, L)
    x = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with ExpArguments(B * H * L) as seen:
        with torch.no_grad():
            att(q, k, v, causal=causal, key_padding_mask=mask)
        out = att(*x, causal=causal, key_padding_mask=mask)
        out.backward(torch.randn(out.shape, generator=g))
    assert seen.ranges  # the feature exponentials were seen
    bad = [r for r in seen.ranges if not (LOW <= r[0] and r[1] <= HIGH)]
    assert not bad, bad


@pytest.mark.parametrize("window", [0, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_wide_logit_spreads_stay_in_range_and_accurate(causal, window):
    # keys of large norm, as real checkpoints have (the first layer of all-MiniLM-L6-v2 reaches arguments of -242):
    # most features of those keys lie far more than 87 below their stabilisers; on a CPU they are clamped there
    d, m = 16, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 48, d, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, ::5] *= 8.0
    fmap = FeatureMap("softmax", draw_projection(m, d, seed=0).to(torch.float64))
    op = favor_causal if causal else favor_bidirectional
    x = [t.float().requires_grad_(True) for t in (q, k, v)]
    with ExpArguments(2 * 2 * 48) as seen:
        out = op(*x, fmap, None, local_window=window)
        out.backward(torch.ones_like(out))
    assert not [r for r in seen.ranges if not (LOW <= r[0] and r[1] <= HIGH)], seen.ranges
    ref = naive_linear_attention(q, k, v, fmap, causal=causal, local_window=window)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4
