"""The zero-shot notice: a Performer model whose FAVOR+ layers never went through the statistics step says so
once, at its first forward, with what the step gains and how to run it.

Every model gets one ``ZeroShotNotice`` shared by all its FavorAttention layers (``attach_favor`` creates it,
on conversion and on loading). The attention paths call ``notice_uncalibrated(favor)`` before attending; the
first call reads the layers' ``FavorAttention.calibrated`` (their ``stats_calibrated`` buffers, kept as Python
state: no host sync after the first read, which the layers' own forward needs anyway) and remembers that it
looked, so later calls cost a Python attribute read. Nothing is said while ``calibrate_feature_statistics``
runs (``statistics_step()``), nor for calibrated models (also those loaded from a calibrated checkpoint).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator

import torch

from ..attention import FavorAttention
from .caller import above_progress_bars, user_frame

_IN_STATISTICS_STEP = contextvars.ContextVar("hf_performer_statistics_step", default=False)

MESSAGE = (
    "{n} of the {total} FAVOR+ layers of this Performer model have no fitted statistics: it was converted without "
    "the statistics step, which brings a conversion much closer to the original model in seconds, without training "
    "(for example all-MiniLM-L6-v2, m = 256: mean embedding cosine to the original about 0.75 without it, about 0.89 "
    "with it; the README's quality tables give causal models' numbers). "
    "Run it once on a few dozen texts of the kind the model will see, then save the model:\n"
    "{how}"
    "This warning is shown once per model."
)
HOW = (
    "    hf_performer.calibrate_feature_statistics(model, tokenizer(texts, padding=True, return_tensors=\"pt\"))\n"
    "or convert with `hf-performer convert SOURCE OUT` (without --zero-shot: its statistics step reads built-in "
    "English text, or your own with --calibration-data texts.txt). "
)
HOW_ENCODER_DECODER = (  # (the CLI converts single models only)
    "    batch = tokenizer(texts, padding=True, return_tensors=\"pt\")\n"
    "    batch[\"labels\"] = tokenizer(targets, padding=True, return_tensors=\"pt\")[\"input_ids\"]\n"
    "    hf_performer.calibrate_feature_statistics(model, batch)\n"
    "(the decoder's layers are calibrated on its own tokens). "
)


class ZeroShotNotice:
    """The layers of one model and whether their calibration state was already looked at."""

    def __init__(self, layers: list[FavorAttention], encoder_decoder: bool = False):
        self.layers = list(layers)
        self.considered = False
        self.how = HOW_ENCODER_DECODER if encoder_decoder else HOW

    def check(self) -> None:
        if self.considered or _IN_STATISTICS_STEP.get() or not self.layers:
            return
        self.considered = True
        # Python state the layers keep anyway (read once per buffer); layers whose settings read no statistic need none
        flags = [m.calibrated or not m.config.uses_statistics() for m in self.layers]
        missing = flags.count(False)
        if missing:
            frame = user_frame()[0]  # the user's line that ran the model, not torch's or transformers' internals
            # no registry: Python's once-per-location filter would hide other models' notices; no module_globals:
            # it breaks `python -c`
            with above_progress_bars():  # (a first forward may run inside the Trainer's bar)
                warnings.warn_explicit(MESSAGE.format(n=missing, total=len(flags), how=self.how), UserWarning,
                                       frame.f_code.co_filename, frame.f_lineno,
                                       module=frame.f_globals.get("__name__"), registry=None)


def share_notice(layers: list[FavorAttention], encoder_decoder: bool = False) -> None:
    """Give ``layers`` (all FAVOR+ layers of one model) one shared notice; ``encoder_decoder``: of a composite
    encoder-decoder model, whose statistics step needs decoder inputs too."""
    notice = ZeroShotNotice(layers, encoder_decoder)
    for m in layers:
        m.__dict__["_zero_shot_notice"] = notice  # a plain attribute: not a submodule, not in the state dict


def notice_uncalibrated(favor: FavorAttention) -> None:
    """Warn once per model if its FAVOR+ layers have no fitted statistics (see the module docstring)."""
    if torch.compiler.is_compiling():  # (a warning would break the graph: an eager forward says it)
        return
    notice = favor.__dict__.get("_zero_shot_notice")
    if notice is not None:
        notice.check()


@contextlib.contextmanager
def statistics_step() -> Iterator[None]:
    """Inside this block (the statistics step's own forward) the notice stays silent."""
    token = _IN_STATISTICS_STEP.set(True)
    try:
        yield
    finally:
        _IN_STATISTICS_STEP.reset(token)
