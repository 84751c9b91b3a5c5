"""The Python API: `import rsmtdf` stays light, every exported name has a docstring, and the README's
"Use it from Python" snippet runs as written on generated data laid out where it looks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

from rsmtdf.data.datasets import open_dataset
from rsmtdf.data.splits import make_splits


def readme_snippet() -> str:
    section = (ROOT / "README.md").read_text().split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_exports_are_lazy_and_documented():
    code = ("import sys, rsmtdf; assert 'torch' not in sys.modules, 'import rsmtdf loaded torch'; "
            "missing = [n for n in rsmtdf.__all__ if not (getattr(rsmtdf, n).__doc__ or '').strip()]; "
            "assert not missing, missing; print(' '.join(rsmtdf.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("FeatureCache", "Student", "load_trained", "load_model", "predict_scene", "extract_features",
                 "train_student", "Trainer", "export_model"):
        assert name in proc.stdout.split()


def test_readme_snippet_runs(tmp_path, synthetic_root):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "demo.toml").write_text((ROOT / "pipeline" / "demo.toml").read_text())
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "data").symlink_to(synthetic_root)  # where `rsmtdf demo` puts its scenes
    make_splits(open_dataset("loveda", synthetic_root), tmp_path / "runs" / "demo" / "splits")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", readme_snippet()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples, ['effnet_lite0', 'effnet_lite1']" in proc.stdout
    assert "4 steps, best val mIoU" in proc.stdout
    maps = list((tmp_path / "maps").glob("*.tif"))
    assert len(maps) == 1 and maps[0].stat().st_size > 0
