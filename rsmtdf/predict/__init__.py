"""Trained models at work: whole scenes mapped window by window (`blend`, `mapping`) and exports for
serving (`export`)."""

from ..pipeline.trained import model_scaling
from .blend import Tiling
from .mapping import Outputs, map_scenes, predict_scene

__all__ = ["Outputs", "Tiling", "map_scenes", "model_scaling", "predict_scene"]
