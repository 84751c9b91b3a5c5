"""Shared fixtures: real LoveDA scenes when present, generated scenes always, a tiny recipe, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a model hub
# One torch intra-op thread per process: the suite runs on two xdist workers (pyproject's addopts), and
# on a loaded 2-core machine two threads per process run many times slower (BENCHMARKS.md, "Why
# --threads 1"). Set before torch is imported, so this process and every subprocess start with it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
LOVEDA_SAMPLE = ROOT.parent / "shared" / "data" / "loveda-sample"


@pytest.fixture(scope="session")
def loveda_sample() -> Path:
    if not LOVEDA_SAMPLE.is_dir():
        pytest.skip(f"real LoveDA sample absent: {LOVEDA_SAMPLE} (it sits beside the repository in CI)")
    return LOVEDA_SAMPLE


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Generated LoveDA-layout scenes of 512² (one DWL tile each): 6 train, 2 val."""
    from rsmtdf.data.synthetic import make_landcover_dataset

    return make_landcover_dataset(tmp_path_factory.mktemp("synthetic"), train_scenes=3, val_scenes=1, size=512, seed=1)


def write_recipe(path: Path, data_root: Path, splits: Path, *, views: int = 2, crop: int = 56,
                 teachers: str = '["effnet_lite0"]', sizes: str = "{ effnet_lite0 = 64 }", extra: str = "",
                 dataset: str = "loveda", data: str = "") -> Path:
    """A tiny recipe: small crops and one fast real-weights teacher, so a test extracts in seconds;
    `data` adds lines to its [data] section."""
    path.write_text(f"""
[data]
dataset = "{dataset}"
root = "{data_root}"
splits = "{splits}"
{data}
[views]
count = {views}
crop_size = {crop}
[teachers]
names = {teachers}
sizes = {sizes}
{extra}
""")
    return path


@pytest.fixture()
def tiny(tmp_path, synthetic_root):
    """(recipe, cache path) for the generated scenes, with split lists written."""
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits

    splits = tmp_path / "splits"
    make_splits(open_dataset("loveda", synthetic_root), splits)
    return write_recipe(tmp_path / "recipe.toml", synthetic_root, splits), tmp_path / "cache"


def tiny_student(translator_hidden: int = 64, **train: object) -> str:
    """[student] and [train] of a recipe with a tiny random ViT/14 student (48 dims, 4 blocks, no hub
    download), batches of 2 loaded in this process; `train` adds [train] keys (TOML values)."""
    keys = {"batch_size": 2, "workers": 0, **train}
    return ('\n[student]\nencoder = "vit_small_patch14_dinov2"\npretrained = false\n'
            f"translator_hidden = {translator_hidden}\nkwargs = {{ embed_dim = 48, depth = 4, num_heads = 3 }}\n"
            "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))


STUDENT = tiny_student(lr=1e-4, head_lr_multiplier=10.0, eval_every=1000)
TEACHERS = '["effnet_lite0", "effnet_lite1"]'
SIZES = "{ effnet_lite0 = 56, effnet_lite1 = 28 }"  # lite1 at 28 px: the CLIP-like second student pass


@pytest.fixture(scope="session")
def student_cache(tmp_path_factory, synthetic_root) -> tuple[Path, Path, Path]:
    """(recipe, cache, folder): a finalized two-teacher cache of the generated scenes and a recipe
    with the tiny student, extracted once for every module that trains from it. Tests write their
    runs under their own tmp_path, never into the folder."""
    return extracted(tmp_path_factory.mktemp("student-cache"), synthetic_root, STUDENT)


def extracted(tmp: Path, synthetic_root: Path, student: str) -> tuple[Path, Path, Path]:
    """(recipe, cache, tmp): the generated scenes split and extracted under `tmp` with the
    two-teacher recipe and `student`'s sections."""
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits

    make_splits(open_dataset("loveda", synthetic_root), tmp / "splits")
    recipe = write_recipe(tmp / "recipe.toml", synthetic_root, tmp / "splits", teachers=TEACHERS, sizes=SIZES,
                          extra=student)
    run_cli("extract-features", "-r", recipe, "-o", tmp / "cache", "--workers", "0", check=True)
    return recipe, tmp / "cache", tmp


def train_cli(student_cache: tuple[Path, Path, Path], run: Path, *extra: str) -> list[str]:
    """`rsmtdf train` from the shared cache into `run`, as arguments after `rsmtdf`."""
    recipe, cache, _ = student_cache
    return ["train", "--cache", str(cache), "--split", "10pct", "-r", str(recipe), "--run-dir", str(run), *extra]


def train_run(student_cache: tuple[Path, Path, Path], run: Path, *extra: str, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`rsmtdf train` from the shared cache into `run`, checked unless told otherwise."""
    return run_cli(*train_cli(student_cache, run, *extra), check=check, env=env)


PROCESS_START_VARS = ("OMP_NUM_THREADS",)  # read by torch once, when a process starts


def run_cli(*args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rsmtdf ARGS` as a user runs it, but in this process: `main()` under click's isolation (its own
    stdout, stderr, argv, environment and working directory), so no call pays seconds of imports.
    What a fresh process would show stays visible: an uncaught exception prints its traceback to the
    command's stderr and exits 1, warnings print to stderr under Python's default filters (not
    pytest's), and OMP_NUM_THREADS in `env` sets torch's intra-op threads for this call alone.
    Process behaviour itself (signals, ranks, modules absent, the interpreter's exit) is tested
    through `run_process`."""
    import torch
    from click.testing import CliRunner

    from rsmtdf.cli import main

    env = {k: str(v) for k, v in (env or {}).items()}
    threads, here, argv = torch.get_num_threads(), os.getcwd(), sys.argv
    with CliRunner().isolation(env=env) as (out, err, _), warnings.catch_warnings():
        _python_warnings()
        for name in PROCESS_START_VARS:
            if name in env:
                torch.set_num_threads(int(env[name]))
        sys.argv = ["rsmtdf", *map(str, args)]
        os.chdir(cwd or ROOT)
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = _exit_status(exc.code)
        except Exception:  # what the interpreter does with an exception nobody caught
            traceback.print_exc()
            code = 1
        finally:
            sys.argv = argv
            os.chdir(here)
            torch.set_num_threads(threads)
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.CompletedProcess(["rsmtdf", *map(str, args)], code, _text(out.getvalue()),
                                           _text(err.getvalue()))
    return _checked(proc, check)


def run_process(*args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rsmtdf ARGS` in a subprocess, for what only a process shows (its interpreter's exit status,
    a fresh import of everything, environment read at start)."""
    proc = subprocess.run([sys.executable, "-m", "rsmtdf.cli", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    return _checked(proc, check)


def _checked(proc: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"rsmtdf {' '.join(map(str, proc.args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _text(data: bytes) -> str:
    """Output as `subprocess.run(text=True)` reads it: universal newlines, so a progress bar's \\r
    ends a line there too."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


def _exit_status(code: object) -> int:
    """The status `sys.exit(code)` gives a process (a message is printed to stderr, status 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _python_warnings() -> None:
    """Python's default warning filters, and warnings shown on (the command's) stderr, as in a
    fresh interpreter; pytest's own filters and recorder stay outside the command."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category, append=True)
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def hand_identity(ids: list[str], root: Path | str, classes, teachers: dict[str, tuple[int, int]], input_size: int,
                  views: int, crop: int, storage: str = "float16", tile: int | None = None):
    """The identity of a cache written by hand from known arrays: a `folder` dataset of `ids` at
    `root` with the class table `classes`, teachers {name: (grid, dim)} of no known architecture."""
    from rsmtdf.cache.identity import DatasetIdentity, Identity, SplitsIdentity, TeacherIdentity
    from rsmtdf.transforms.views import ViewSpec
    from rsmtdf.utils.files import ids_sha256

    made = tuple(TeacherIdentity(n, "timm", "m", input_size, -1, False, (0.5,) * 3, (0.5,) * 3, grid=g, dim=d,
                                 weights_sha256="0" * 64) for n, (g, d) in teachers.items())
    dataset = DatasetIdentity("folder", ids_sha256(ids), classes, tile, tile, str(root), len(ids))
    return Identity(dataset, SplitsIdentity("y", None, "x"), ViewSpec(count=views, crop_size=crop), made, storage)


def model_identity(class_names, dataset=None, splits: Path | None = None):
    """A checkpoint's identity: of a real dataset and its split lists when given (evaluation checks
    both), else a placeholder for checkpoints that are refused before their data is opened."""
    from rsmtdf.cache.identity import DatasetIdentity, Identity, SplitsIdentity
    from rsmtdf.data.classes import ClassTable

    data = DatasetIdentity.of(dataset) if dataset is not None else \
        DatasetIdentity("folder", "-", ClassTable(tuple(class_names)), None, None, "-")
    return Identity(data, SplitsIdentity.of(splits) if splits is not None else SplitsIdentity("-", None, "-"))


@contextlib.contextmanager
def killed_at_step(step: int) -> Iterator[None]:
    """Inside the block, a training run stops (as if killed) when it reaches optimiser step `step`,
    after that step's checkpoint: for resume tests in this process."""
    from rsmtdf.train.trainer import Trainer

    real = Trainer.train_step

    def stopping(self, inp, against=None):
        if self.step == step:
            raise KeyboardInterrupt("killed")
        return real(self, inp, against)

    Trainer.train_step = stopping
    try:
        yield
    finally:
        Trainer.train_step = real
