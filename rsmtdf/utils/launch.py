"""Which process of a launch this is, and which device it runs on.

`torchrun` says it in RANK, WORLD_SIZE and LOCAL_RANK; `srun rsmtdf ...` starts one process per task,
and each one translates SLURM's variables into torchrun's, which `torch.distributed`'s env://
rendezvous reads: rank = SLURM_PROCID, world size = SLURM_NTASKS, local rank = SLURM_LOCALID,
master = the first host of SLURM_STEP_NODELIST (or SLURM_NODELIST / SLURM_JOB_NODELIST), expanded
here from SLURM's compressed form (`gpu[01-04,07]`) so no `scontrol` is needed; the port is
MASTER_PORT if set, else derived from the job id so two jobs sharing a node do not collide.

`choose_device` is the one place a device option is read: `auto` is this process's GPU when there
is one, and a device the machine does not have is refused in one line before anything is written.
"""

from __future__ import annotations

import os
import re

from ..errors import RsmtdfError

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


def env_int(*names: str) -> int | None:
    """The first of the environment variables `names` that is set, as an integer."""
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def launch_rank() -> tuple[int, int]:
    """(this process's index, processes in all) of a torchrun or SLURM launch; (0, 1) alone."""
    return env_int("RANK", "SLURM_PROCID") or 0, env_int("WORLD_SIZE", "SLURM_NTASKS") or 1


def local_rank() -> int:
    return env_int("LOCAL_RANK", "SLURM_LOCALID") or 0


def choose_device(option: str | None = "auto", flag: str = "--device") -> str:
    """The device a command runs on, checked: `auto` (or None) is this process's GPU (by local rank,
    modulo the GPUs it sees: `srun --gpus-per-task=1` shows each task one) when CUDA is there, else
    the CPU; `cpu`, `cuda` and `cuda:N` are refused in one line when this machine has no such device."""
    import torch

    if option in (None, "auto"):
        return f"cuda:{local_rank() % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(option)
    except (RuntimeError, TypeError):
        raise RsmtdfError(f"{flag} {option}: not a device; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise RsmtdfError(f"{flag} {option}: rsmtdf runs on cpu or cuda (choose auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise RsmtdfError(f"{flag} {option}: this machine has no CUDA device (torch {torch.__version__} sees none); "
                          f"use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise RsmtdfError(f"{flag} {option}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                          f"(cuda:0..cuda:{count - 1})")
    return str(device)
