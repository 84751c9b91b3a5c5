"""rsmtdf: RS-MTDF semi-supervised segmentation with a precomputed teacher feature cache.

The library in a few names (imported on first use, so `import rsmtdf` stays light):

- `load_recipe(path)`: a recipe TOML over the paper's defaults, typed and checked (`Recipe`);
- `resolve(recipe)`: the recipe against its data: dataset, scaling and the `Identity` of its cache;
- `extract_features(recipe, output)`: stage one, returns the `FeatureCache`;
- `train_student(recipe, cache, split, run_dir)`: stage two (or build a `Trainer` and call `fit`);
- `load_trained(checkpoint)` / `load_model(checkpoint or export)`: `(Student, Identity, Recipe)`;
- `predict_scene(net, raster, outputs, scaling, tiling, classes, device)`: a COG class map of one scene, streamed;
- `export_model(checkpoint, "onnx" | "safetensors")`: a model for serving, with its sidecar;
- `FeatureCache`, `Identity`, `Student`, `Trainer`, `RsmtdfError`: the classes behind them.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_recipe": "config.recipe", "resolve": "pipeline.resolve", "extract_features": "api", "train_student": "api",
    "Trainer": "train.trainer", "FeatureCache": "cache.store", "Identity": "cache.identity", "Student": "models.student",
    "load_trained": "pipeline.trained", "load_model": "pipeline.trained", "predict_scene": "predict.mapping",
    "export_model": "predict.export", "RsmtdfError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rsmtdf' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
