"""`srun rsmtdf train` without torchrun: SLURM's variables become the process group's, and two fake
SLURM tasks on CPU (gloo) train exactly as `torchrun --nproc-per-node 2` does."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_cli

from rsmtdf.errors import RsmtdfError
from rsmtdf.utils.launch import BASE_PORT, PORT_SPAN, first_host, slurm_env

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


@pytest.mark.parametrize("nodelist, host", [
    ("node[01-04,07]", "node01"), ("gpu07", "gpu07"), ("a1,b[2-3]", "a1"), ("node[07,01-04]", "node07"),
    ("rack[2-3]-n[010-012],x", "rack2-n010"), ("login-[5-6]-ib", "login-5-ib")])
def test_first_host_of_a_compressed_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_variables_become_torchrun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_NODELIST": "other[1-9]", "SLURM_STEP_NODELIST": "gpu[03-04]"}
    assert slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                              "MASTER_PORT": str(BASE_PORT + 123456 % PORT_SPAN)}
    assert slurm_env({**env, "MASTER_PORT": "4000"})["MASTER_PORT"] == "4000"
    assert slurm_env({**env, "RANK": "0", "WORLD_SIZE": "2"}) == {}  # torchrun inside a SLURM job wins
    assert slurm_env({**env, "SLURM_NTASKS": "1"}) == {}  # a single task needs no group
    with pytest.raises(RsmtdfError, match="SLURM_NTASKS > 1"):
        slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def _free_port_for_a_job() -> tuple[int, int]:
    """(job id, port) where the port the job id implies is free on the loopback address."""
    for _ in range(100):
        port = random.randrange(BASE_PORT, BASE_PORT + PORT_SPAN)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - BASE_PORT + 7 * PORT_SPAN, port
    raise RuntimeError("no free port")


def test_two_slurm_tasks_train_like_torchrun(student_cache, tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("SLURM_")}
    base["OMP_NUM_THREADS"] = "1"
    args = ("--max-steps", "2")
    _, port = _free_port_for_a_job()  # not torchrun's default 29500, which another test's torchrun may hold
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", str(port), "-m", "rsmtdf.cli", *train_cli(student_cache, tmp_path / "torchrun", *args)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=base)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]

    job, _ = _free_port_for_a_job()
    tasks = [subprocess.Popen([sys.executable, "-m", "rsmtdf.cli", *train_cli(student_cache, tmp_path / "slurm", *args)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "SLURM_JOB_ID": str(job), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(rank), "SLURM_STEP_NODELIST": "localhost",
                                   "SLURM_NODELIST": "localhost"})
             for rank in range(2)]
    outs = [t.communicate(timeout=600) for t in tasks]
    for t, (_, err) in zip(tasks, outs):
        assert t.returncode == 0, err[-3000:]
    assert sum(out.count("trained 2 steps") for out, _ in outs) == 1  # rank 0 alone reports

    def losses(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert len(losses(tmp_path / "slurm")) == 2
    for a, b in zip(losses(tmp_path / "torchrun"), losses(tmp_path / "slurm"), strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    a = torch.load(tmp_path / "torchrun" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "slurm" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    for part in ("student", "ema"):
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-6, atol=1e-7, msg=f"{part} {key}")
