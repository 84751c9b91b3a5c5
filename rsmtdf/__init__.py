"""rsmtdf: RS-MTDF semi-supervised segmentation with a precomputed teacher feature cache."""

__version__ = "0.1.0"
