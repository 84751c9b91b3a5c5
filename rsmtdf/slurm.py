"""Launching under SLURM without torchrun: `srun rsmtdf train ...` starts one process per task, and
each one translates SLURM's variables into the ones `torch.distributed`'s env:// rendezvous reads.

rank = SLURM_PROCID, world size = SLURM_NTASKS, local rank = SLURM_LOCALID, master = the first host of
SLURM_STEP_NODELIST (or SLURM_NODELIST / SLURM_JOB_NODELIST), expanded here from SLURM's compressed
form (`gpu[01-04,07]`) so no `scontrol` is needed; the port is MASTER_PORT if set, else derived from
the job id so two jobs sharing a node do not collide.
"""

from __future__ import annotations

import os
import re

from .errors import RsmtdfError

BASE_PORT, PORT_SPAN = 15000, 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[01-04,07],big[1-2]` → `node01`; `a-[3-5]-ib` → `a-3-ib`."""
    depth, end = 0, len(nodelist)
    for k, ch in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = k
            break
    entry = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], entry)
    if not host or "[" in host or "]" in host:
        raise RsmtdfError(f"SLURM node list '{nodelist}': cannot read its first host")
    return host


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    """The torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) a SLURM task
    implies; empty when torchrun already set them or the process is not a task of a multi-task step."""
    torchrun = "RANK" in env and "WORLD_SIZE" in env
    if torchrun or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS") or 1) <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise RsmtdfError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_NODELIST says where rank 0 runs")
    port = env.get("MASTER_PORT") or str(BASE_PORT + int(env.get("SLURM_JOB_ID", "0") or 0) % PORT_SPAN)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes), "MASTER_PORT": port}


def adopt_slurm_env() -> None:
    """Under `srun`, set the torchrun variables from SLURM's so the env:// rendezvous finds its peers."""
    os.environ.update(slurm_env(dict(os.environ)))
