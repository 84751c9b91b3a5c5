"""Caches on object storage: extraction into and training from an S3 bucket served on 127.0.0.1 by
moto's server, with s3fs as the real client (endpoint from the standard AWS_ENDPOINT_URL), gives a
cache equal to a local one object for object and byte for byte; without a backend a URL ends in one
line naming the extra to install."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from test_errors import error_line

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """The environment a client needs to reach a fresh bucket `rsmtdf` on a loopback S3 server."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    client(env).mkdir("rsmtdf")
    yield env
    server.stop()


def client(env: dict):
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True)


def local_objects(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def s3_objects(env: dict, prefix: str) -> dict[str, bytes]:
    fs = client(env)
    return {key.removeprefix(prefix + "/"): fs.cat_file(key) for key in sorted(fs.find(prefix))}


def test_extract_into_and_train_from_s3_equals_local(s3, student_cache, tmp_path):
    recipe, local, _ = student_cache  # the shared local cache, made with the same command
    url = "s3://rsmtdf/caches/tiny"
    out = run_cli("extract-features", "-r", recipe, "-o", url, "--workers", "0", env=s3, check=True).stdout
    assert "cache complete" in out
    remote, here = s3_objects(s3, "rsmtdf/caches/tiny"), local_objects(local)
    assert remote.keys() == here.keys() and len(here) > 5
    for key in here:
        assert remote[key] == here[key], key
    assert "complete" in run_cli("inspect", url, env=s3, check=True).stdout

    runs = tmp_path / "runs"
    for name, cache in (("local", local), ("s3", url)):
        run_cli("train", "--cache", cache, "--split", "10pct", "-r", recipe, "--run-dir", runs / name,
                "--max-steps", "2", env=s3, check=True)
    losses = {name: [r for r in map(json.loads, (runs / name / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for name in ("local", "s3")}
    assert len(losses["s3"]) == 2 and losses["s3"] == losses["local"]


@pytest.mark.parametrize("url, extra", [("s3://bucket/cache", "s3"), ("gs://bucket/cache", "gcs")])
def test_url_without_its_backend_names_the_extra(url, extra):
    # the backends are absent for this process alone: an import of them fails as if not installed
    code = ("import sys; sys.modules['s3fs'] = sys.modules['gcsfs'] = None; from rsmtdf.cli import main; "
            f"sys.argv = ['rsmtdf', 'inspect', {url!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    error_line(proc, url, f"pip install 'rsmtdf[{extra}]'")


def test_unknown_protocol_says_one_line():
    error_line(run_cli("inspect", "nosuch://bucket/cache"), "nosuch://bucket/cache", "nosuch://")
