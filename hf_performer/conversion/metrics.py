"""Fidelity metrics of a converted model against its original (evaluation only, no gradients).

* ``layer_errors``: per attention layer, ||student - teacher|| / ||teacher|| of the attention outputs
  (real tokens), both *teacher-forced* (the student's attention runs on the teacher's input hidden states:
  each layer's own approximation error) and *in-model* (both models run freely: errors accumulate);
* ``encoder_metrics``: mean-pooled embeddings -> mean cosine to the original, and the Spearman correlation
  of all pairwise cosine similarities (does the converted model rank text pairs the same way);
* ``causal_metrics``: perplexity of both models and the mean per-token KL(teacher || student).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .capture import (
    attention_inputs,
    attention_names,
    attention_outputs,
    forward_kwargs,
    replaced_attention_inputs,
)
from .losses import token_kl


def _device(model):
    return next(model.parameters()).device


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def _sq(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float().pow(2).sum(-1) * w).sum()


@torch.no_grad()
def layer_errors(student, teacher, batches, progress: bool = False) -> dict:
    """{"names": [...], "teacher_forced": [rel err per layer], "in_model": [...]}. A shared attention module (ALBERT)
    has one entry per layer it serves (``name``, ``name#1``, ...: ``capture.call_key``)."""
    names = attention_names(student)
    num_tf: dict[str, float] = {}
    num_im: dict[str, float] = {}
    den: dict[str, float] = {}
    for batch in tqdm(batches, desc="layer errors", disable=not progress, leave=False):
        t_batch, s_batch = _to(batch, _device(teacher)), _to(batch, _device(student))
        with attention_inputs(teacher, names) as t_in, attention_outputs(teacher, names) as t_out:
            teacher(**t_batch, **forward_kwargs(teacher))
            t_in, t_out = dict(t_in), dict(t_out)
        with attention_outputs(student, names) as s_out:
            student(**s_batch, **forward_kwargs(student))
            s_free = dict(s_out)
        inputs = {n: x.to(_device(student)) for n, x in t_in.items()}
        with replaced_attention_inputs(student, inputs), attention_outputs(student, names) as s_out:
            student(**s_batch, **forward_kwargs(student))
            s_forced = dict(s_out)
        w = batch["attention_mask"].float()
        for n in t_out:  # every attention call
            t = t_out[n].cpu()
            num_tf[n] = num_tf.get(n, 0.0) + _sq(s_forced[n].cpu() - t, w).item()
            num_im[n] = num_im.get(n, 0.0) + _sq(s_free[n].cpu() - t, w).item()
            den[n] = den.get(n, 0.0) + _sq(t, w).item()
    keys = list(den)
    rel = lambda num: [math.sqrt(num[n] / max(den[n], 1e-30)) for n in keys]
    return {"names": keys, "teacher_forced": rel(num_tf), "in_model": rel(num_im)}


def mean_pooled(model, batches, progress: bool = False, desc: str = "embeddings") -> torch.Tensor:
    """[N, H] mean of the last hidden states over real tokens, for every sequence of ``batches``."""
    out = []
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            b = _to(batch, _device(model))
            h = model.base_model(**b, **forward_kwargs(model)).last_hidden_state.float()
            w = b["attention_mask"].unsqueeze(-1).float()
            out.append(((h * w).sum(1) / w.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0 .. n-1 of x [n] (float64), tied values sharing the mean of their ranks (the "average" ranking of
    Spearman's coefficient with ties)."""
    values, order = x.double().sort()
    new = torch.ones_like(values, dtype=torch.bool)
    new[1:] = values[1:] != values[:-1]
    group = new.cumsum(0) - 1  # [n]: which run of equal values each sorted entry belongs to
    counts = torch.bincount(group).double()
    mean_rank = counts.cumsum(0) - counts + (counts - 1) / 2  # first rank of each run + half its extent
    r = torch.empty_like(values)
    r[order] = mean_rank[group]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation of a and b (same number of entries, any shape; ties get average ranks), or None
    where it is undefined: fewer than two entries, or one side constant (no ranking to compare)."""
    ra, rb = _ranks(a.flatten()), _ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = ra.norm() * rb.norm()
    if len(ra) < 2 or norm == 0:
        return None
    return float((ra * rb).sum() / norm)


def pairwise_cosines(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e.double(), dim=-1)
    i, j = torch.triu_indices(len(e), len(e), 1)
    return (e @ e.T)[i, j]


def embedding_agreement(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> dict:
    cos = F.cosine_similarity(student_emb.double(), teacher_emb.double(), dim=-1)
    out = {"embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
           "sequences": len(cos)}
    out["pairwise_spearman"] = spearman(pairwise_cosines(student_emb), pairwise_cosines(teacher_emb)) if len(cos) > 2 else None
    return out


def encoder_metrics(student, teacher, batches, progress: bool = False) -> dict:
    s = mean_pooled(student, batches, progress, "student embeddings")
    t = mean_pooled(teacher, batches, progress, "teacher embeddings")
    return embedding_agreement(s, t)


@torch.no_grad()
def causal_metrics(student, teacher, batches, progress: bool = False) -> dict:
    """Perplexities (next-token, real tokens) and mean KL(teacher || student) per predicted token."""
    nll = {"student": 0.0, "teacher": 0.0}
    kl, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        logits = {}
        for key, model in (("student", student), ("teacher", teacher)):
            b = _to(batch, _device(model))
            logits[key] = model(**b, **forward_kwargs(model)).logits[:, :-1].float().cpu()
        labels = batch["input_ids"][:, 1:]
        w = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).float()
        n = int(w.sum())
        for key in nll:
            ce = F.cross_entropy(logits[key].transpose(1, 2), labels, reduction="none")
            nll[key] += float((ce * w).sum())
        kl += float(token_kl(logits["student"], logits["teacher"], w)) * n
        count += n
    count = max(count, 1)
    return {"perplexity_student": math.exp(nll["student"] / count), "perplexity_teacher": math.exp(nll["teacher"] / count),
            "perplexity_ratio": math.exp((nll["student"] - nll["teacher"]) / count), "kl_to_teacher": kl / count,
            "tokens": count}
