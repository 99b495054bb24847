"""hf-performer: Performer FAVOR+ attention for Hugging Face Transformers models."""

__version__ = "0.1.0"

from .attention import FavorAttention  # noqa: E402
from .features import FeatureMap, draw_projection  # noqa: E402
from .ops import FavorState  # noqa: E402
from .settings import PerformerConfig  # noqa: E402

__all__ = ["FavorAttention", "FavorState", "FeatureMap", "PerformerConfig", "__version__", "draw_projection"]
