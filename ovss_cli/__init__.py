"""ovss: open-vocabulary semantic segmentation (SAN, SAM + Alpha-CLIP) as a library and a CLI."""
from __future__ import annotations

from .errors import OvssError
from .segmenter import OTHER, UNLABELLED, Prediction, Segment, Segmenter, load_segmenter
from .vocabulary import Vocabulary, VocabularyClass

__version__ = "0.1.0"

__all__ = [
    "OTHER",
    "OvssError",
    "Prediction",
    "Segment",
    "Segmenter",
    "UNLABELLED",
    "Vocabulary",
    "VocabularyClass",
    "load_segmenter",
    "__version__",
]
