"""Padding never poisons training (issue 11, part 1): finite gradients, exactly zero at padded keys, for masks of
every shape — left, right and interior padding, rows without any real key, padding that fills whole chunks — at
every length 1 … 3 × chunk_size, causal and bidirectional, with and without a local window, in float32 and
bfloat16; gradients at real positions equal autograd through the O(L²) reference (float64); and one training
step of converted BERT and GPT-2 models on batches with such rows has finite gradients everywhere."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from hf_performer import PerformerConfig
from hf_performer.attention import FavorAttention
from hf_performer.integration import convert_to_performer
from hf_performer.ops import naive_linear_attention

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK, H, D = 4, 2, 4
LENGTHS = range(1, 3 * CHUNK + 1)
ROWS = ["left by whole chunks", "left to the last token", "right", "interior chunk", "no real key", "random", "none"]


def masks(L: int, seed: int = 0) -> torch.Tensor:
    """[len(ROWS), L] bool (True = real token), one row per padding shape of ROWS."""
    g = torch.Generator().manual_seed(seed + L)
    m = torch.ones(len(ROWS), L, dtype=torch.bool)
    m[0, : max(0, min(L - 1, CHUNK * ((L - 1) // CHUNK)))] = False  # whole chunks of left padding
    m[1, : L - 1] = False
    m[2, (L + 1) // 2 :] = False
    if L > 2 * CHUNK:
        m[3, CHUNK : 2 * CHUNK] = False  # a whole chunk inside the sequence
    else:
        m[3, 1 : L - 1] = False
    m[4] = False
    m[5] = torch.rand(L, generator=g) < 0.5
    return m


def qkv(B: int, L: int, dtype: torch.dtype, seed: int = 0, std: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: (std * torch.randn(B, H, L, D, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    return mk(), mk(), mk()


def favor(window: int, dtype: torch.dtype) -> FavorAttention:
    cfg = PerformerConfig(nb_features=8, chunk_size=CHUNK, local_window=window, seed=1)
    return FavorAttention(D, cfg, num_heads=H).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window", [0, 2], ids=["pure", "window2"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradients_are_finite_and_zero_at_padded_keys(causal, window, dtype):
    attn, problems = favor(window, dtype), []
    for L in LENGTHS:
        mask = masks(L)
        q, k, v = qkv(len(ROWS), L, dtype)
        out = attn(q, k, v, causal=causal, key_padding_mask=mask)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        gq, gk, gv = torch.autograd.grad((out * g).float().sum(), (q, k, v))
        for b, row in enumerate(ROWS):
            if not torch.isfinite(out[b]).all():
                problems.append(f"L={L} {row}: output not finite")
            for name, grad in ("q", gq), ("k", gk), ("v", gv):
                if not torch.isfinite(grad[b]).all():
                    problems.append(f"L={L} {row}: d{name} not finite")
                elif name != "q" and (grad[b][:, ~mask[b]] != 0).any():
                    problems.append(f"L={L} {row}: d{name} nonzero at padded keys")
    assert not problems, f"{len(problems)} problems: " + "; ".join(problems)


def first_real(row: torch.Tensor) -> int:
    return int(row.long().argmax()) if bool(row.any()) else len(row)


@pytest.mark.parametrize("window", [0, 2], ids=["pure", "window2"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("L", [1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_real_gradients_equal_autograd_through_the_reference(L, causal, window):
    """float64; per row, the reference sees the row from its first position that any query can use: causal
    queries before the first real key see nothing (output 0, gradient 0), a row without a real key is all such."""
    mask = masks(L)
    attn = favor(window, torch.float64)
    q, k, v = qkv(len(ROWS), L, torch.float64)
    g = torch.randn(len(ROWS), H, L, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast = torch.autograd.grad((attn(q, k, v, causal=causal, key_padding_mask=mask) * g).sum(), (q, k, v))
    for b, row in enumerate(mask):
        s = first_real(row) if causal else (0 if bool(row.any()) else L)
        assert (fast[0][b, :, :s] == 0).all(), f"queries that see no key must get zero gradient ({ROWS[b]})"
        if s == L:
            continue
        qs, ks, vs = (x.detach()[b : b + 1, :, s:].requires_grad_(True) for x in (q, k, v))
        rmask = row[None, s:]
        fmap = attn._prepare(qs.detach(), ks.detach(), causal, rmask, None)  # per-row statistics: constants
        ref = naive_linear_attention(qs, ks, vs, fmap, causal, rmask, local_window=window)
        slow = torch.autograd.grad((ref * g[b : b + 1, :, s:]).sum(), (qs, ks, vs))
        for name, a, r in zip("qkv", fast, slow):
            torch.testing.assert_close(a[b : b + 1, :, s:], r, rtol=1e-7, atol=1e-9, msg=f"d{name}, {ROWS[b]}")


# ------------------------------------------------------------------------------------------------ models
V = 64


def bert_batch():
    ids = torch.randint(3, V, (3, 2 * CHUNK + 2), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, : 2 * CHUNK] = 0  # left padding that fills two whole chunks
    mask[1] = 0  # a row without any real token
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


def gpt2_batch():
    ids = torch.randint(3, V, (3, 3 * CHUNK + 1), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, : 3 * CHUNK] = 0  # left padding over three whole chunks: one real token
    mask[1, : CHUNK] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "use_cache": False}


MODELS = {
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2)), bert_batch),
    "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, pad_token_id=0)), gpt2_batch),
}


@pytest.mark.parametrize("window", [0, 2], ids=["pure", "window2"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_model_training_step_has_finite_gradients(name, window):
    build, batch = MODELS[name]

    def step(model) -> list[str]:  # the names of the parameters whose gradient is not finite
        model.train()
        loss = model(**batch()).loss
        assert torch.isfinite(loss)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        bad = sorted(n for n, g in grads.items() if not torch.isfinite(g).all())
        assert len(grads) > 10 and sum(g.abs().sum() for n, g in grads.items() if n not in bad) > 0
        return bad

    torch.manual_seed(0)
    assert step(build()) == []  # the stock model trains on this batch
    torch.manual_seed(0)
    model = convert_to_performer(build(), PerformerConfig(nb_features=8, chunk_size=CHUNK, local_window=window))
    bad = step(model)
    assert not bad, f"{len(bad)} of {len(list(model.parameters()))} parameter gradients are not finite: {bad[:5]}"
