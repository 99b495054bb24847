"""hf-performer conversion: ``hf-performer convert`` / ``hf-performer report`` and their Python API.

    from hf_performer.conversion import convert, report, CalibrationConfig
    convert("bert-base-uncased", "./bert-performer", {"nb_features": 256}, max_position_embeddings=4096,
            calibration_data="./my_texts.txt", calibrate_model=True, calibration=CalibrationConfig(steps=300))
    report("bert-base-uncased", "./bert-performer", "./heldout.txt")

The pieces are usable alone: ``extend_positions``, ``calibrate_model_statistics``, ``calibrate``,
``layer_errors`` / ``encoder_metrics`` / ``causal_metrics``.
"""

from .calibrate import CalibrationConfig, calibrate
from .convert import convert
from .errors import ConversionError
from .metrics import causal_metrics, encoder_metrics, layer_errors
from .positions import extend_positions
from .report import report
from .statistics import calibrate_model_statistics

__all__ = [
    "CalibrationConfig",
    "ConversionError",
    "calibrate",
    "calibrate_model_statistics",
    "causal_metrics",
    "convert",
    "encoder_metrics",
    "extend_positions",
    "layer_errors",
    "report",
]
