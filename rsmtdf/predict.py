"""Map whole scenes with a trained model: GeoTIFF class maps that keep the input's CRS and transform."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

from .checkpoint import load_checkpoint
from .data import DATASETS, read_raster, to_unit_rgb
from .evaluate import predict
from .errors import RsmtdfError
from .model import Student
from .recipe import Recipe, recipe_from_json
from .plots import palette


def load_trained(checkpoint: str | Path, which: str = "ema") -> tuple[Student, dict, Recipe]:
    """(model, identity, recipe) of a checkpoint; `which` is "ema" or "student". Weights that do not
    fit the model its config describes (an edited or mixed-up file) are refused in one line."""
    ckpt = load_checkpoint(checkpoint)
    try:
        net = Student.from_config(ckpt["identity"]["model"], source=checkpoint)
        net.load_state_dict(ckpt[which])
    except (KeyError, TypeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise RsmtdfError(f"{checkpoint}: its {which} weights do not fit the model its config describes "
                          f"({type(exc).__name__}: {detail})") from None
    return net.eval(), ckpt["identity"], recipe_from_json(ckpt["recipe"], str(checkpoint))


def predict_scene(net: Student, path: Path, out: Path, recipe: dict, class_names: list[str], dataset: str,
                  device: str, mode: str = "sliding") -> Path:
    """Class map of one raster of any size, written as a single-band uint8 GeoTIFF with a colour table."""
    image, crs, transform = read_raster(path)
    x = torch.from_numpy(to_unit_rgb(image, tuple(recipe["data"]["bands"]), recipe["data"]["max_value"]))
    logits = predict(net, x.permute(2, 0, 1)[None].to(device), mode, net.config["crop_size"], net.patch)
    classes = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
    table = DATASETS[dataset].classes.colors if dataset in DATASETS and dataset != "folder" else {}
    colours = palette(len(class_names), table)
    profile = {"driver": "GTiff", "height": classes.shape[0], "width": classes.shape[1], "count": 1,
               "dtype": "uint8", "compress": "deflate", "nodata": 255}
    if crs is not None:
        profile.update(crs=crs, transform=rasterio.Affine(*transform))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(classes, 1)
            dst.write_colormap(1, {k: (*map(int, colours[k]), 255) for k in range(len(class_names))})
            dst.update_tags(classes=json.dumps(class_names))
    tmp.replace(out)
    return out
