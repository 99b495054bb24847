"""PerformerConfig: the FAVOR+ settings that live in a model's config.json.

A small validated dataclass in the style of PEFT's configs: every field is checked in
``__post_init__`` and a bad value raises ``ValueError`` naming the field and what is accepted.
``to_dict`` / ``from_dict`` / ``to_json_string`` round-trip losslessly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

KERNELS = ("softmax", "favor++", "relu", "trig")
FEATURE_NORMS = ("chi", "sqrt_d")
ALIGNED_KERNELS = ("softmax", "favor++")  # kernels whose features the statistics step can replace
ALIGNED_ESTIMATOR = "aligned-softmax"  # what ``PerformerConfig.estimator`` calls importance-sampled features


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ValueError(f"PerformerConfig.{name}={value!r} is invalid: {accepted}.")


@dataclass
class PerformerConfig:
    """Settings of FAVOR+ attention.

    Args:
        nb_features: number of random features ``m`` per layer (more = lower variance, more compute).
        kernel: ``"softmax"`` positive random features (FAVOR+, unbiased for exp(q.k)), ``"favor++"``
            optimal positive random features (Likhosherstov et al. 2022; unbiased, bounded, lower
            variance for large |q+k|), ``"relu"`` (the paper's generalized Performer-ReLU, a different
            kernel) or ``"trig"`` (sin/cos features, the paper's baseline; kept for comparison).
            Note: with ``aligned_features`` (the default), a layer whose statistics are calibrated uses
            importance-sampled softmax features instead of the softmax or favor++ features, so after the
            statistics step both kernels give the same model; ``estimator()`` names what actually runs.
        orthogonal: draw the rows of the projection in orthogonal blocks (lower variance) or iid; after the
            statistics step, the noise of the importance-sampled rows likewise (``aligned_features``).
        feature_norm: ``"chi"`` rescales orthogonal rows to chi-distributed norms (keeps every row
            marginally N(0, I), so the estimator stays unbiased); ``"sqrt_d"`` uses the fixed norm sqrt(d)
            (biased), for the importance-sampled rows' noise too.
        redraw_interval: redraw the features every this many optimizer steps (0 = never).
        seed: base seed; every draw derives from (seed, layer id, draw count).
        chunk_size: C, positions per chunk of the causal op's chunk-parallel form (and of decoding steps): its
            intra-chunk matrices are [C, C], its states one per C positions. Bidirectional attention is one pass.
        eps: the additive floor of ``relu`` features only (keeps their normaliser positive). Never added
            to softmax or favor++ features.
        center_keys: subtract a shared vector c = E[q] + E[k] from the keys before the feature map. Exact
            for softmax attention (it adds a per-query constant to every logit) and it shrinks |q+k|,
            which cuts the estimator's variance (it grows like exp(|q+k|^2)).
        balance_qk: rescale q by a and k by 1/a (a per head) so that mean |q|^2 = mean |k|^2; exact,
            and it lowers the variance further.
        aligned_features: once a layer's statistics are calibrated (``calibrate_statistics``), draw its
            features by importance sampling from a proposal fitted to the q + k of the pairs that carry
            its attention (softmax and favor++ kernels; still unbiased and positive, far lower variance
            on real checkpoints). False keeps N(0, I) features.
        local_window: w >= 1 takes each query's nearest keys exactly (softmax terms for |i - j| <= w,
            or the w previous keys and itself when causal) and FAVOR for all other keys, in one
            normalisation; 0 (the default) is pure FAVOR. Extra cost O(L * w * (m + d)); decoding keeps
            the last w keys and values besides the running sums. Positive kernels (softmax, favor++) only.
    """

    nb_features: int = 256
    kernel: str = "softmax"
    orthogonal: bool = True
    feature_norm: str = "chi"
    redraw_interval: int = 0
    seed: int = 0
    chunk_size: int = 64
    eps: float = 1e-6
    center_keys: bool = True
    balance_qk: bool = True
    aligned_features: bool = True
    local_window: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.nb_features) or self.nb_features < 1:
            _fail("nb_features", self.nb_features, "expected a positive integer such as 256")
        if self.kernel not in KERNELS:
            _fail("kernel", self.kernel, f"expected one of {', '.join(KERNELS)}")
        if self.kernel == "trig" and self.nb_features % 2:
            _fail("nb_features", self.nb_features, "the trig kernel needs an even number (sin and cos halves)")
        if not isinstance(self.orthogonal, bool):
            _fail("orthogonal", self.orthogonal, "expected True or False")
        if self.feature_norm not in FEATURE_NORMS:
            _fail("feature_norm", self.feature_norm, f"expected one of {', '.join(FEATURE_NORMS)}")
        if not is_int(self.redraw_interval) or self.redraw_interval < 0:
            _fail("redraw_interval", self.redraw_interval, "expected an integer >= 0 (0 = never redraw)")
        if not is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "expected an integer >= 0")
        if not is_int(self.chunk_size) or self.chunk_size < 1:
            _fail("chunk_size", self.chunk_size, "expected a positive integer such as 64 (the default)")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            _fail("eps", self.eps, "expected a float in (0, 1) such as 1e-6")
        for name in ("center_keys", "balance_qk", "aligned_features"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "expected True or False")
        if not is_int(self.local_window) or self.local_window < 0:
            _fail("local_window", self.local_window, "expected an integer >= 0 (0 = pure FAVOR, e.g. 4)")
        if self.local_window and self.kernel not in ("softmax", "favor++"):
            _fail("local_window", self.local_window, f"kernel {self.kernel!r} has no exact form to mix with; use "
                  "kernel='softmax' or 'favor++', or local_window=0")
        if not isinstance(self.extra, dict):
            _fail("extra", self.extra, "expected a dict")
        self.eps = float(self.eps)

    def uses_statistics(self) -> bool:
        """Whether a layer with these settings reads what the statistics step fits (``calibrate_statistics``): the
        key shift (``center_keys``), the balance factor (``balance_qk``), favor++'s parameter, or the
        importance-sampled features (``aligned_features`` with a softmax or favor++ kernel). When False the step
        changes nothing."""
        return (self.center_keys or self.balance_qk or self.kernel == "favor++"
                or (self.aligned_features and self.kernel in ALIGNED_KERNELS))

    def estimator(self, statistics_calibrated: bool, causal: bool = False) -> str:
        """The feature map that a layer with these settings actually uses (read-only; derived, not stored).

        ``"aligned-softmax"`` (importance-sampled positive softmax features, see ``aligned_features``) when
        ``statistics_calibrated`` (the statistics step ran: ``calibrate_feature_statistics`` or
        ``hf-performer convert --calibration-data``), ``aligned_features`` is on and the kernel is softmax or
        favor++: the kernel's own features are then replaced. ``"softmax"`` for favor++ in ``causal`` attention
        without statistics (its parameter is measured only by the statistics step; 0 reduces it to softmax
        features). Otherwise ``kernel`` itself."""
        if statistics_calibrated and self.aligned_features and self.kernel in ALIGNED_KERNELS:
            return ALIGNED_ESTIMATOR
        if self.kernel == "favor++" and causal and not statistics_calibrated:
            return "softmax"
        return self.kernel

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | PerformerConfig) -> PerformerConfig:
        if isinstance(data, PerformerConfig):
            return cls(**data.to_dict())
        if not isinstance(data, dict):
            raise ValueError(f"PerformerConfig.from_dict expected a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"PerformerConfig got unknown field(s) {unknown}; accepted fields: {sorted(known)}."
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> PerformerConfig:
        return cls.from_dict(json.loads(text))
