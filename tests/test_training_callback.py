"""PerformerRedrawCallback: the redraw schedule in optimizer steps under Trainer (gradient accumulation,
gradient checkpointing), the features it draws, and a resumed run that continues with the same features."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils.data import Dataset

import hf_performer.integration as I
from hf_performer.attention import FavorAttention
from hf_performer.settings import PerformerConfig
from hf_performer.training import PerformerRedrawCallback, PerformerTrainer, feature_draw_counts

V, L, N = 64, 12, 32


pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(Dataset):
    """Sequence classification: label = whether token 5 occurs more often than token 6 (learnable)."""

    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 9, (n, L), generator=g)
        self.labels = ((self.ids == 5).sum(1) > (self.ids == 6).sum(1)).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(L, dtype=torch.long), "labels": self.labels[i]}


def tiny_model(redraw_interval=2, seed=0):
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=2)
    model = tf.BertForSequenceClassification(cfg)
    return I.convert_to_performer(model, PerformerConfig(nb_features=16, seed=7, redraw_interval=redraw_interval))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=5,
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=0, data_seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return tf.TrainingArguments(**base)


def train(model, training_args, resume=None, callbacks=None, trainer_cls=tf.Trainer):
    trainer = trainer_cls(model=model, args=training_args, train_dataset=Toy(),
                          callbacks=[PerformerRedrawCallback()] if callbacks is None else callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def expected_projection(module: FavorAttention, draw: int) -> torch.Tensor:
    return module._draw(draw).float()


@pytest.mark.parametrize("accumulation,checkpointing", [(1, False), (3, True)])
def test_redraw_counts_optimizer_steps(tmp_path, accumulation, checkpointing):
    """5 optimizer steps, interval 2 -> draw 2 on every layer, whatever the micro-batches per step."""
    model = tiny_model(redraw_interval=2)
    trainer = train(model, args(tmp_path, gradient_accumulation_steps=accumulation,
                                activation_checkpointing=checkpointing))
    assert trainer.state.global_step == 5
    assert feature_draw_counts(model) == [2] * len(model.favor_modules())
    for m in model.favor_modules():
        torch.testing.assert_close(m.projection, expected_projection(m, 2), rtol=0, atol=0)


def test_no_interval_never_redraws(tmp_path):
    """PerformerTrainer adds the callback to every model: without an interval it trains and never redraws."""
    model = tiny_model(redraw_interval=0)
    before = [m.projection.clone() for m in model.favor_modules()]
    train(model, args(tmp_path, max_steps=3), callbacks=[], trainer_cls=PerformerTrainer)
    assert feature_draw_counts(model) == [0] * len(before)
    for m, p in zip(model.favor_modules(), before):
        assert torch.equal(m.projection, p)


@pytest.mark.parametrize("callback_cls", [PerformerRedrawCallback, I.PerformerRedrawCallback])
def test_an_explicit_callback_that_could_never_redraw_is_refused(tmp_path, callback_cls):
    model = tiny_model(redraw_interval=0)
    with pytest.raises(ValueError, match=r"redraw_interval=0.*PerformerConfig\(redraw_interval=N\)"):
        train(model, args(tmp_path, max_steps=1), callbacks=[callback_cls()])
    assert feature_draw_counts(model) == [0] * len(model.favor_modules())


def test_a_run_shorter_than_the_interval_warns(tmp_path):
    model = tiny_model(redraw_interval=10)
    with pytest.warns(UserWarning, match="max_steps=2, fewer than the model's redraw_interval=10"):
        train(model, args(tmp_path, max_steps=2))
    assert feature_draw_counts(model) == [0] * len(model.favor_modules())


def test_callback_refuses_a_softmax_model(tmp_path):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    with pytest.raises(ValueError, match="no FavorAttention layers"):
        train(tf.BertForSequenceClassification(cfg), args(tmp_path, max_steps=1))


@pytest.mark.parametrize("trainer_cls", [tf.Trainer, PerformerTrainer])
def test_resumed_run_matches_uninterrupted(tmp_path, trainer_cls):
    """Stop after a checkpoint at step 3 (interval 2: draw 1 inside the checkpoint), resume in a fresh model:
    parameters, projections and draw counts equal an uninterrupted 6-step run (plain Trainer + callback, and
    PerformerTrainer, which adds the callback itself)."""
    full = tiny_model(redraw_interval=2)
    train(full, args(tmp_path / "full", max_steps=6))

    first = tiny_model(redraw_interval=2)
    train(first, args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3),
          callbacks=[PerformerRedrawCallback(), _StopAt(3)])
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert ckpt.is_dir()

    resumed = tiny_model(redraw_interval=2, seed=123)  # different init and draws until the checkpoint loads
    callbacks = [] if trainer_cls is PerformerTrainer else [PerformerRedrawCallback()]
    trainer = train(resumed, args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=3),
                    resume=str(ckpt), callbacks=callbacks, trainer_cls=trainer_cls)
    assert sum(isinstance(cb, PerformerRedrawCallback) for cb in trainer.callback_handler.callbacks) == 1

    assert feature_draw_counts(resumed) == feature_draw_counts(full) == [3] * len(full.favor_modules())
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class _StopAt(tf.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_checkpoint_holds_draw_count(tmp_path):
    """The saved checkpoint has draw_count / projection: a plain from_pretrained gets the same features."""
    model = tiny_model(redraw_interval=1)
    train(model, args(tmp_path, max_steps=3))
    model.save_pretrained(tmp_path / "saved")
    back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert feature_draw_counts(back) == [3] * len(back.favor_modules())
    for a, b in zip(model.favor_modules(), back.favor_modules()):
        assert torch.equal(a.projection, b.projection)


def test_the_redraw_schedule_reads_no_device_value_between_redraws():
    """maybe_redraw_features runs after every optimizer step: it keeps each layer's draw count as a Python int and
    reads the buffer only after it changed (a redraw, a checkpoint load), since each read of a GPU tensor waits for
    the step's queued work. The schedule itself still follows the buffer: a loaded count is honoured."""
    from test_ops_gpu_shape import SYNC, Dispatched

    model = tiny_model(redraw_interval=3)
    modules = model.favor_modules()
    I.maybe_redraw_features(model, 0)  # the first call may read each layer's count once
    reads = []
    for step in range(1, 8):
        with Dispatched() as d:
            I.maybe_redraw_features(model, step)
        reads.append(d.ops[SYNC])
    assert reads == [0] * 7 and feature_draw_counts(model) == [2] * len(modules)
    for m in modules:
        m.draw_count.fill_(5)  # as a checkpoint load writes it
    assert not I.maybe_redraw_features(model, 8)  # draw 5 is past step 8's draw 2: nothing to do
    assert I.maybe_redraw_features(model, 18) and feature_draw_counts(model) == [6] * len(modules)
    for m in modules:
        torch.testing.assert_close(m.projection, expected_projection(m, 6), rtol=0, atol=0)


def test_a_second_run_on_a_saved_model_redraws_every_interval_of_its_own_steps(tmp_path):
    """A new run (global step 0) on a saved model that has drawn 4 times used to wait until step 5 for its first
    redraw (the schedule asked for draw step // interval, never going back), silently (found in a bug hunt). It now
    continues from the model's draw count: 3 steps at interval 1 -> draw 7, the sequence's next features."""
    model = tiny_model(redraw_interval=1)
    train(model, args(tmp_path / "first", max_steps=4))
    assert feature_draw_counts(model) == [4] * len(model.favor_modules())
    model.save_pretrained(tmp_path / "saved")
    again = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    train(again, args(tmp_path / "second", max_steps=3))
    assert feature_draw_counts(again) == [7] * len(again.favor_modules())
    for m in again.favor_modules():
        torch.testing.assert_close(m.projection, expected_projection(m, 7), rtol=0, atol=0)


@pytest.fixture
def notice(monkeypatch):
    """The unfollowed-redraw notice, armed afresh, after 5 training forwards per layer instead of 64."""
    from hf_performer.integration import redraw_notice

    monkeypatch.setattr(redraw_notice, "_WARNED", False)
    monkeypatch.setattr(redraw_notice, "TRAINING_CALLS", 5)
    return redraw_notice


def _redraw_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "nothing follows that schedule" in str(w.message)]


def test_a_plain_trainer_without_the_callback_says_nothing_redraws(tmp_path, notice):
    """redraw_interval > 0 under a plain Trainer without PerformerRedrawCallback never redrew, and nothing said so
    (found in a bug hunt): the model now warns once, naming the callback, PerformerTrainer and
    maybe_redraw_features. With the callback, or a loop that follows the schedule, it stays quiet."""
    import warnings

    model = tiny_model(redraw_interval=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(model, args(tmp_path / "plain", max_steps=8), callbacks=[])
    [message] = _redraw_warnings(record)
    assert "redraw_interval=1" in message and "PerformerRedrawCallback" in message
    assert "PerformerTrainer" in message and "maybe_redraw_features(model, step)" in message
    assert feature_draw_counts(model) == [0] * len(model.favor_modules())  # (what it warns about)

    notice._WARNED = False
    followed = tiny_model(redraw_interval=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(followed, args(tmp_path / "callback", max_steps=8))
    assert _redraw_warnings(record) == [] and feature_draw_counts(followed) == [8] * len(followed.favor_modules())

    own = tiny_model(redraw_interval=2).train()  # a loop of one's own, 3 micro-batches per optimizer step
    opt = torch.optim.SGD(own.parameters(), lr=1e-3)
    data = Toy()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(1, 5):
            for i in range(3):
                batch = data[(3 * step + i) % len(data)]
                own(**{k: v[None] for k, v in batch.items()}).loss.backward()
            opt.step()
            opt.zero_grad()
            I.maybe_redraw_features(own, step)
    assert _redraw_warnings(record) == [] and feature_draw_counts(own) == [2] * len(own.favor_modules())
    start = I.run_start_draws(own, 0)  # a second loop of one's own continues the draws
    for step in (1, 2):
        I.maybe_redraw_features(own, step, start)
    assert start == [2] * len(own.favor_modules()) and feature_draw_counts(own) == [3] * len(own.favor_modules())
