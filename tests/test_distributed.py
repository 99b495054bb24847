"""Data-parallel training on this CPU machine: 2 processes (gloo) train a small converted BERT with Trainer
(PerformerTrainer) and a redraw interval.

* both ranks hold identical projections (redrawn without communication), draw counts and parameters, and
  the loss goes down;
* kill-and-resume: a run killed (os._exit, no cleanup) right after its checkpoint at step 4, resumed from
  that checkpoint in new processes, ends with the parameters and projections of the uninterrupted run;
* FSDP2 (torch's fully_shard over gloo, in a plain training loop: accelerate, and so Trainer, runs FSDP only on
  GPUs and falls back to DDP on CPU processes): the parameters are sharded, the FAVOR+ buffers stay whole and follow
  the schedule on every rank, and the gathered state reloads;
* ranks that ran the statistics step on different data (DDP without its buffer broadcast): training starts from
  rank 0's FAVOR+ buffers on every rank (``broadcast_favor_buffers``).

The worker is this file: ``python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py OUT ...``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT, INTERVAL = 8, 4, 2
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------- worker
def worker(out: str, crash_after_save: int, resume: str, calibrate: bool = False) -> None:
    import torch
    import torch.distributed as dist
    import transformers as tf
    from torch.utils.data import Dataset

    import hf_performer.integration as hfp
    from hf_performer import PerformerConfig
    from hf_performer.training import PerformerTrainer

    torch.set_num_threads(1)
    tf.utils.logging.set_verbosity_error()

    class Toy(Dataset):
        """Label 1: every token from {3, 4, 5}; label 0: every token from {6, 7, 8} (learned in a few steps)."""

        def __init__(self, n=64):
            g = torch.Generator().manual_seed(0)
            self.labels = torch.randint(0, 2, (n,), generator=g)
            self.ids = torch.randint(0, 3, (n, 16), generator=g) + 3 + 3 * (1 - self.labels[:, None])

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": self.labels[i]}

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    model = hfp.convert_to_performer(tf.BertForSequenceClassification(cfg),
                                     PerformerConfig(nb_features=16, seed=11, redraw_interval=INTERVAL))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if calibrate:  # each rank on its own shard of text
        from hf_performer import calibrate_feature_statistics

        ids = torch.randint(3, 16, (4, 16), generator=torch.Generator().manual_seed(100 + rank))
        calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    args = tf.TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=STEPS, warmup_steps=0,
        use_cpu=True, report_to="none", save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo", ddp_broadcast_buffers=not calibrate,
    )

    class KillAfterSave(tf.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == crash_after_save:
                dist.barrier()  # both ranks have written their part of the checkpoint
                os._exit(17)  # a crash: no cleanup, nothing after this point reaches the disk

    trainer = PerformerTrainer(model=model, args=args, train_dataset=Toy(),
                               callbacks=[KillAfterSave()] if crash_after_save else [])
    trainer.train(resume_from_checkpoint=resume or None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "global_step": trainer.state.global_step}, Path(out) / f"final_rank{rank}.pt")
    if rank == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (Path(out) / "losses.json").write_text(json.dumps(losses))


# ---------------------------------------------------------------------------------------------- tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_worker(out: str) -> None:
    """FSDP2 with torch's fully_shard in a plain loop (the tiny BERT and toy task of ``worker``): each rank runs the
    statistics step on its own text, ``broadcast_favor_buffers`` makes them agree, then 8 steps with
    ``maybe_redraw_features``; rank r writes its FAVOR+ buffers, whether its parameters are sharded, and (rank 0)
    the gathered full state and the losses."""
    import torch
    import torch.distributed as dist
    import transformers as tf
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import hf_performer.integration as hfp
    from hf_performer import PerformerConfig, broadcast_favor_buffers, calibrate_feature_statistics

    torch.set_num_threads(1)
    tf.utils.logging.set_verbosity_error()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0)
    model = hfp.convert_to_performer(tf.BertForSequenceClassification(cfg),
                                     PerformerConfig(nb_features=16, seed=11, redraw_interval=INTERVAL))
    ids = torch.randint(3, 16, (4, 16), generator=torch.Generator().manual_seed(100 + rank))
    calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    broadcast_favor_buffers(model)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g, losses = torch.Generator().manual_seed(1 + rank), []
    for step in range(1, STEPS + 1):
        labels = torch.randint(0, 2, (4,), generator=g)
        x = torch.randint(0, 3, (4, 16), generator=g) + 3 + 3 * (1 - labels[:, None])
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        hfp.maybe_redraw_features(model, step)
        losses.append(loss.item())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    torch.save({"favor": {n: b.clone() for n, b in model.named_buffers() if ".favor." in n},
                "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
                "full": full if rank == 0 else None, "losses": losses}, Path(out) / f"fsdp_rank{rank}.pt")
    dist.destroy_process_group()


def launch(out: Path, crash_after_save: int = 0, resume: str = "", calibrate: bool = False,
           fsdp: bool = False) -> subprocess.CompletedProcess:
    args = ["fsdp"] if fsdp else [str(crash_after_save), resume, str(int(calibrate))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _final(out: Path, rank: int) -> dict:
    import torch

    return torch.load(out / f"final_rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_full")
    _ok(launch(out))
    return out


@pytest.mark.slow
def test_two_ranks_hold_identical_features_and_parameters(uninterrupted):
    import torch

    from hf_performer.attention import FavorAttention

    r0, r1 = _final(uninterrupted, 0), _final(uninterrupted, 1)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["global_step"] == STEPS
    assert r0["state"].keys() == r1["state"].keys()
    for name, t in r0["state"].items():
        assert torch.equal(t, r1["state"][name]), name
    counts = {k: int(v) for k, v in r0["state"].items() if k.endswith("favor.draw_count")}
    assert len(counts) == 2 and set(counts.values()) == {STEPS // INTERVAL}
    for key in counts:  # the projection is the draw (seed, layer, draw count): recomputed here, no communication
        layer = int(key.split("layer.")[1].split(".")[0])
        fresh = FavorAttention(16, {"nb_features": 16, "seed": 11}, num_heads=2, layer_id=layer)._draw(STEPS // INTERVAL)
        assert torch.equal(r0["state"][key.replace("draw_count", "projection")], fresh.float())
    losses = json.loads((uninterrupted / "losses.json").read_text())
    assert len(losses) == STEPS
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    import torch

    crashed = launch(tmp_path, crash_after_save=SAVE_AT)
    assert crashed.returncode != 0  # killed right after the checkpoint
    ckpt = tmp_path / f"checkpoint-{SAVE_AT}"
    assert (ckpt / "model.safetensors").is_file() and not (tmp_path / "final_rank0.pt").exists()
    _ok(launch(tmp_path, resume=str(ckpt)))
    full, resumed = _final(uninterrupted, 0)["state"], _final(tmp_path, 0)["state"]
    assert _final(tmp_path, 1)["global_step"] == STEPS
    for name, t in full.items():
        torch.testing.assert_close(resumed[name], t, rtol=0, atol=1e-6, msg=name)
    assert set(int(v) for k, v in resumed.items() if k.endswith("draw_count")) == {STEPS // INTERVAL}


@pytest.mark.slow
def test_ranks_calibrated_on_different_data_train_with_rank_0s_features(tmp_path):
    """The statistics step fits each rank's own data; with DDP's buffer broadcast off nothing else would make the
    ranks agree, and they trained different FAVOR+ layers for the whole run (found in a bug hunt). Training now
    begins from rank 0's buffers on every rank."""
    import torch

    proc = launch(tmp_path, calibrate=True)
    _ok(proc)
    assert "differed from rank 0's" in proc.stderr  # rank 1 says its own statistics were replaced
    r0, r1 = _final(tmp_path, 0)["state"], _final(tmp_path, 1)["state"]
    favor = [k for k in r0 if ".favor." in k]
    assert any(k.endswith("stats_calibrated") and bool(r0[k]) for k in favor)
    for name in favor:
        assert torch.equal(r0[name], r1[name]), name


@pytest.mark.slow
def test_fsdp2_trains_redraws_and_saves_a_loadable_model(tmp_path):
    """FSDP2 (fully_shard, gloo, 2 CPU processes; ``fsdp_worker``): the parameters are sharded, the FAVOR+ buffers
    are whole and equal on both ranks (calibrated on different text, then broadcast) and follow the schedule, and
    the gathered full state loads strictly into the converted model. (This test once ran Trainer with an FSDP
    config, which accelerate turns into DDP on CPU processes without a word: FSDP was never exercised.)"""
    import torch
    import transformers as tf

    import hf_performer.integration as hfp
    from hf_performer import PerformerConfig

    _ok(launch(tmp_path, fsdp=True))
    r0, r1 = (torch.load(tmp_path / f"fsdp_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["sharded"] and r1["sharded"]
    assert r0["favor"].keys() == r1["favor"].keys() and r0["favor"]
    for name, buf in r0["favor"].items():
        assert torch.equal(buf, r1["favor"][name]), name
    cfg = tf.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, num_labels=2)
    model = hfp.convert_to_performer(tf.BertForSequenceClassification(cfg),
                                     PerformerConfig(nb_features=16, seed=11, redraw_interval=INTERVAL))
    model.load_state_dict(r0["full"], strict=True)
    for m in model.favor_modules():
        assert int(m.draw_count) == STEPS // INTERVAL and bool(m.stats_calibrated)
        assert m.aligned_projection.abs().sum() > 0  # importance-sampled features, redrawn with the schedule
    assert torch.equal(r0["full"]["bert.encoder.layer.0.attention.self.favor.projection"],
                       model.favor_modules()[0]._draw(STEPS // INTERVAL).float())
    losses = r0["losses"]
    assert sum(losses[-2:]) < sum(losses[:2]), losses


if __name__ == "__main__":
    if sys.argv[2] == "fsdp":
        fsdp_worker(sys.argv[1])
    else:
        worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], bool(int(sys.argv[4])))
