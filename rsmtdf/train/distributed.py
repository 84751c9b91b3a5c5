"""Multi-process training: join the torchrun or `srun` group (NCCL on GPUs, gloo on CPUs)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..utils.launch import adopt_slurm_env, choose_device


def setup_distributed(device: str = "auto") -> str:
    """Join the torchrun or `srun` group if there is one; returns this process's device, checked
    (`choose_device`: `auto` is the GPU of its local rank, modulo the GPUs it sees, since a task of
    `srun --gpus-per-task=1` sees only its own)."""
    adopt_slurm_env()
    device = choose_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return device
