"""`--set section.key=value` overrides any recipe key, checked like a file value; `recipe show`
prints the resolved recipe; a cache keeps the recipe it was made with, and `train` without -r uses it."""

from __future__ import annotations

import json
import tomllib

from conftest import run_cli, tiny_student, write_recipe

from rsmtdf.config.recipe import Recipe, load_recipe


def test_recipe_show_applies_sets_and_reads_back_equal():
    proc = run_cli("recipe", "show", "-r", "pipeline/demo.toml", "--set", "views.count=3",
                   "--set", "data.root=/data/my scenes", "--set", "teachers.sizes={ effnet_lite1 = 56 }", check=True)
    shown = tomllib.loads(proc.stdout)
    assert shown["views"]["count"] == 3 and shown["data"]["root"] == "/data/my scenes"
    assert shown["teachers"]["sizes"] == {"effnet_lite1": 56}
    expected = load_recipe("pipeline/demo.toml", ["views.count=3", "data.root=/data/my scenes",
                                                  "teachers.sizes={ effnet_lite1 = 56 }"])
    assert Recipe.from_dict(shown, "shown") == expected


def test_a_bad_set_is_one_line():
    cases = {"views.count=2.7": "expected an integer", "views.nope=1": "unknown recipe key 'views.nope'",
             "nope.count=1": "unknown recipe key", "views": "expected SECTION.KEY=VALUE",
             "views.hflip=no": "expected true or false", "train.conf_thresh=1.5": "in [0, 1]"}
    for item, says in cases.items():
        proc = run_cli("recipe", "show", "--set", item)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: --set"), (item, proc.stderr)
        assert says in lines[0] and "Traceback" not in proc.stderr, (item, lines)


def test_set_changes_the_cache_and_train_without_recipe_uses_the_caches(tmp_path, synthetic_root):
    from rsmtdf.cache import FeatureCache
    from rsmtdf.data.datasets import open_dataset
    from rsmtdf.data.splits import make_splits

    splits = tmp_path / "splits"
    make_splits(open_dataset("loveda", synthetic_root), splits)
    recipe = write_recipe(tmp_path / "r.toml", synthetic_root, splits, sizes="{ effnet_lite0 = 56 }",
                          extra=tiny_student(translator_hidden=32))
    cache = tmp_path / "cache"
    run_cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", "--set", "views.count=1",
            "--set", "views.seed=7", check=True)
    attrs = FeatureCache.open(str(cache)).attrs
    assert attrs["views"]["count"] == 1 and attrs["views"]["seed"] == 7
    kept = Recipe.from_dict(tomllib.loads(attrs["recipe"]), "kept")
    assert kept.views.count == 1 and kept.student.kwargs == {"embed_dim": 48, "depth": 4, "num_heads": 3}

    run = tmp_path / "run"  # no -r: the cache's recipe, its tiny random student included (no hub needed)
    run_cli("train", "--cache", cache, "--split", "10pct", "--run-dir", run, "--max-steps", "1",
            "--set", "train.lr=1e-5", check=True)
    used = load_recipe(run / "recipe.toml")
    assert used.train.lr == 1e-5 and used.train.max_steps == 1 and used.student.translator_hidden == 32
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
