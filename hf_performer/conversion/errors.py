"""The one exception type of the conversion tools: its message says what is wrong and what to do."""

from __future__ import annotations


class ConversionError(ValueError):
    """A convert / calibrate / report request that cannot be carried out (bad flag, missing source, ...)."""
