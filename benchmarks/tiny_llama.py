"""Train a small Llama-family decoder offline (rotary embeddings, grouped key/value heads), as the second causal-LM
subject of the conversion benchmark (``bench_conversion.py --only llama``).

Same text, tokenizer, split and training recipe as ``tiny_gpt2.py`` (the documentation Python ships, MiniLM's
WordPiece pieces restricted to that text, packed 128-token windows). Model: Llama with 4 layers, width 128, 4 query
heads sharing 2 key/value heads (head_dim 32), SwiGLU MLP 352 wide, RoPE, 256 positions, tied embeddings, attention
dropout 0.1 (Llama has no other dropout; GPT-2's recipe has attention dropout 0.1 too). Without it the model
memorises the 51k training tokens (train loss 1.06, held-out perplexity 111) and its attention becomes very peaked.

    python benchmarks/tiny_llama.py ./tiny-llama             # 1000 steps: a few minutes on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_gpt2 import compact_tokenizer, packed_windows, train_documents, train_lm  # noqa: E402


def train_tiny_llama(out_dir: str | Path, steps: int = 1000, batch_size: int = 8, length: int = 128, lr: float = 3e-3,
                     layers: int = 4, width: int = 128, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                     progress: bool = True) -> dict:
    tok = compact_tokenizer()
    windows = packed_windows(train_documents(), tok, length)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=352, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                            tie_word_embeddings=True, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                            pad_token_id=tok.pad_token_id, attention_dropout=0.1)
    info = train_lm(tf.LlamaForCausalLM, config, tok, windows, out_dir, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed, progress=progress, desc="train tiny Llama")
    info["config"] = {"layers": layers, "width": width, "heads": heads, "kv_heads": kv_heads, "n_positions": 256,
                      "lr": lr, "batch_size": batch_size, "length": length}
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(train_tiny_llama(args.out_dir, steps=args.steps, seed=args.seed))


if __name__ == "__main__":
    main()
