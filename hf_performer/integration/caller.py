"""The user's frame: warnings raised deep inside a forward are attributed to the line that ran the model, and
printed on their own line even when a progress bar (the Trainer's, the calibration's) is on the terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator


def _library_prefixes() -> tuple[str, ...]:
    """Folders of the packages between a user's call and the attention function (hf_performer, transformers,
    torch, accelerate): a warning is attributed to the first frame outside them."""
    import torch as _torch
    import transformers as _transformers

    prefixes = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # hf_performer/
    prefixes += [os.path.dirname(os.path.abspath(m.__file__)) for m in (_torch, _transformers)]
    accelerate = sys.modules.get("accelerate")
    if accelerate is not None and getattr(accelerate, "__file__", None):
        prefixes.append(os.path.dirname(os.path.abspath(accelerate.__file__)))
    return tuple(p + os.sep for p in prefixes)


def user_frame(prefixes: tuple[str, ...] | None = None, depth: int = 1):
    """(frame, stacklevel) of the first frame outside ``prefixes`` (default: hf_performer, transformers, torch,
    accelerate), walking out from the frame ``depth`` levels above this call; the outermost frame when every
    frame is inside. stacklevel counts from that starting frame (1 = the starting frame itself)."""
    prefixes = _library_prefixes() if prefixes is None else prefixes
    frame, level = sys._getframe(depth), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(prefixes):
        frame, level = frame.f_back, level + 1
    return frame, level


def caller_stacklevel(prefixes: tuple[str, ...] | None = None) -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the function that calls this one, pointing at the first
    frame outside ``prefixes`` (default: hf_performer, transformers, torch, accelerate): the user's line
    that called the model, ``Trainer.train`` or ``generate``. The last frame when every frame is inside."""
    return user_frame(prefixes, depth=2)[1]


@contextlib.contextmanager
def above_progress_bars() -> Iterator[None]:
    """While the block runs (a warning raised inside a forward: the first training step's, mid-epoch), every tqdm
    progress bar on the terminal is cleared, and redrawn afterwards: the warning gets its own line instead of
    landing inside the Trainer's or the calibration's bar (``tqdm.external_write_mode``)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # portable remote code (integration.portable) may run where tqdm is not installed
        yield
        return
    with tqdm.external_write_mode(file=sys.stderr):
        yield


def warn_user(message: str) -> None:
    """A ``UserWarning`` attributed to the user's line that ran the model (``caller_stacklevel``), printed on its own
    line above any progress bar (``above_progress_bars``): how hf_performer's once-per-process notices are raised."""
    level = caller_stacklevel()  # (counted from this frame: inside hf_performer, so the walk goes past it)
    with above_progress_bars():
        warnings.warn(message, UserWarning, stacklevel=level)
