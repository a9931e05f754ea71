"""Process-group set-up and the few collectives the trainer needs.

The DeepSpeed launcher (and torchrun) export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; a plain
`python script.py` has none of them and runs as a world of one, for which we fill in a
loopback rendezvous so that `deepspeed.init_distributed` does not go looking for MPI.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

# Ports below the kernel's ephemeral range: bind(0) and outgoing connections never get them,
# so a port picked here stays free until the process it is meant for binds it, seconds later.
# Ray's worker ports (10002-19999 by default) are left out too. Jobs that share a machine
# (e.g. parallel test workers) can each be given a range of their own: DINO_PORT_RANGE=LOW-HIGH.
PICKED_PORTS = (20000, 32768)
PORT_RANGE_ENV = "DINO_PORT_RANGE"
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now (rendezvous, launcher master port, test servers).

    Drawn at random from `$DINO_PORT_RANGE` (LOW-HIGH, HIGH excluded) or `PICKED_PORTS`,
    where the kernel's ephemeral range lies above it (Linux: 32768-60999): a port the kernel
    handed out with bind(0) could be handed out again, to a connection or another bind(0),
    before its user binds it."""
    rng = random.SystemRandom()  # not the seeded module RNG: two processes must not draw alike
    low, high = port_range()
    if _ephemeral_low() >= high:
        for _ in range(200):
            port = rng.randrange(low, high)
            if _bindable(host, port):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_range() -> tuple[int, int]:
    """(low, high) that `free_port` draws from, high excluded."""
    value = os.environ.get(PORT_RANGE_ENV)
    if not value:
        return PICKED_PORTS
    try:
        low, high = (int(v) for v in value.split("-"))
    except ValueError:
        raise ValueError(f"{PORT_RANGE_ENV}={value!r}: expected LOW-HIGH, e.g. 20000-26000") from None
    if not 1024 <= low < high <= 65536:
        raise ValueError(f"{PORT_RANGE_ENV}={value!r}: expected 1024 <= LOW < HIGH <= 65536")
    return low, high


def _ephemeral_low() -> int:
    try:
        return int(Path(EPHEMERAL_RANGE_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0  # unknown: let the kernel choose


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU)."""
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())),
        )
    deepspeed.init_distributed(dist_init_required=True)
    _unlink_shm_allreduce_buffer()


def _shm_allreduce_buffer(rank_: int) -> Path:
    """The POSIX shared-memory file that DeepSpeed's CPU accelerator creates for rank
    `rank_`'s local all-reduce when all ranks are on one machine (~66 MB each)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank_}")


def _unlink_shm_allreduce_buffer() -> None:
    """DeepSpeed's CPU accelerator never unlinks these buffers: every CPU run would leave its ranks' buffers
    in /dev/shm (RAM) until the machine swaps. By the time `init_distributed` returns on
    every rank (the barrier), each rank has mapped every buffer, so the names can go; the
    mappings last until the processes exit, and a killed rank leaves nothing behind."""
    if get_accelerator().device_name() != "cpu" or world_size() == 1:
        return
    dist.barrier()
    _shm_allreduce_buffer(rank()).unlink(missing_ok=True)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Barrier then destroy the group: without it ~1 run in 8 aborts at exit on gloo."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def all_reduce_sum(values: list[float], on: torch.device) -> list[float]:
    """Sum a few floats over ranks in one collective."""
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_objects_to_rank0(obj: Any) -> list[Any] | None:
    """Pickled objects of every rank, in rank order, on rank 0; None elsewhere."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    """Same seed on every rank: model init must agree across ranks (data order is the
    loader's business, seeded separately by rank)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
