"""`rsmtdf export`: one model, no training state, a sidecar that says how to feed it; the ONNX file
run by onnxruntime matches PyTorch's logits at other batch and spatial sizes; `predict` maps with a
safetensors export exactly as with the checkpoint."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli, train_cli
from PIL import Image
from test_errors import error_line

from rsmtdf.pipeline.trained import load_trained


@pytest.fixture(scope="module")
def checkpoint(student_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    run_cli(*train_cli(student_cache, run, "--max-steps", "2"), check=True)
    return run / "best.pt"


def test_onnx_matches_pytorch_at_any_batch_and_patch_multiple(checkpoint, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    proc = run_cli("export", "--checkpoint", checkpoint, "--format", "onnx", "-o", out, check=True)
    assert f"wrote {out} (student model)" in proc.stdout
    net, ident, _ = load_trained(checkpoint, "student")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in ((1, 3, 56, 56), (3, 3, 42, 84), (2, 3, 112, 70)):  # multiples of the 14-px patch
        x = rng.random(shape, dtype=np.float32)
        with torch.no_grad():
            expected = net(torch.from_numpy(x)).logits.numpy()
        (logits,) = session.run(["logits"], {"image": x})
        assert logits.shape == expected.shape == (shape[0], 7, *shape[2:])
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["weights"] == "student" and side["classes"] == ident.class_names
    assert side["input"]["bands"] == [0, 1, 2] and side["model"] == net.config


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # a plain PNG scene
def test_safetensors_holds_one_model_and_predict_takes_it(checkpoint, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "serve" / "loveda.safetensors"
    run_cli("export", "--checkpoint", checkpoint, "--ema", "-o", out, check=True)
    ckpt = torch.load(checkpoint, weights_only=True)
    weights = load_file(str(out))
    assert weights.keys() == ckpt["ema"].keys()  # the EMA model alone: no student, optimiser or step
    for key, value in weights.items():
        assert torch.equal(value, ckpt["ema"][key]), key
    assert out.stat().st_size < 1.05 * sum(v.numel() * v.element_size() for v in weights.values()) + 100_000
    side = json.loads((tmp_path / "serve" / "loveda.safetensors.json").read_text())
    assert side["weights"] == "ema" and len(side["classes"]) == 7 and side["input"]["max_value"] is None

    scene = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(scene)
    run_cli("predict", scene, "--checkpoint", checkpoint, "--model", "ema", "--out", tmp_path / "a", check=True)
    run_cli("predict", scene, "--checkpoint", out, "--out", tmp_path / "b", check=True)
    import rasterio

    with rasterio.open(tmp_path / "a" / "scene.tif") as a, rasterio.open(tmp_path / "b" / "scene.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))


def test_bad_exports_say_one_line(checkpoint, tmp_path, monkeypatch):
    error_line(run_cli("export", "--checkpoint", checkpoint, "--format", "tflite"), "--format tflite", "onnx")
    error_line(run_cli("export", "--checkpoint", tmp_path / "none.pt"), "none.pt", "no checkpoint")
    error_line(run_cli("export", "--checkpoint", checkpoint, "--format", "onnx", "-o", tmp_path / "m.bin"),
               "m.bin", ".onnx")
    # without the onnx extra (its modules absent for this command alone: importing them fails): one line naming it
    with monkeypatch.context() as absent:
        absent.setitem(sys.modules, "onnx", None)
        absent.setitem(sys.modules, "onnxscript", None)
        proc = run_cli("export", "--checkpoint", checkpoint, "--format", "onnx", "-o", tmp_path / "m.onnx")
    error_line(proc, "pip install 'rsmtdf[onnx]'")
    assert not list(tmp_path.glob("*m.onnx*"))
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(b"x")
    error_line(run_cli("predict", tmp_path / "x.png", "--checkpoint", lone), "lone.safetensors.json", "sidecar")
