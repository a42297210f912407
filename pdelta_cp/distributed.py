"""Process-group start-up shared by every entry point: under torchrun/DeepSpeed/mpirun, or self-launched.

``run_distributed(worker, nprocs)`` calls ``worker(*args)`` on every rank with an initialised default process
group. When the process was not started by a launcher (no RANK/WORLD_SIZE in the environment), it starts
``nprocs`` local processes itself and gives each the same environment torchrun would, so a single code
path serves both cases.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _adopt_mpi_environment() -> None:
    """Under mpirun (Open MPI or MPICH), export the RANK/WORLD_SIZE/... variables torch's env:// init reads.

    The master address defaults to loopback (single node) unless MASTER_ADDR is set; rank 0 picks a free
    port and broadcasts it through mpi4py when MASTER_PORT is not set.
    """
    env = os.environ
    rank = env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK")
    size = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
    if rank is None or size is None or "RANK" in env:
        return
    local = env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID") or "0"
    local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS") or size
    env.update(RANK=rank, WORLD_SIZE=size, LOCAL_RANK=local, LOCAL_WORLD_SIZE=local_size)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise RuntimeError("under mpirun, set MASTER_PORT (or install mpi4py so rank 0 can choose one)") from exc
        env["MASTER_PORT"] = str(MPI.COMM_WORLD.bcast(free_port() if int(rank) == 0 else None, root=0))


def launched() -> bool:
    """True under torchrun, the DeepSpeed launcher or mpirun (whose variables are adopted here)."""
    _adopt_mpi_environment()
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: str | None = None, timeout_s: float = 300) -> None:
    """Initialise the default group from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (env://)."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    # Under torchrun the store can outlive a failed attempt: keep each attempt's keys apart, or a restarted
    # rank may read a dead peer's address from the previous attempt and fail to connect.
    from torch.distributed.rendezvous import _create_c10d_store

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"pdelta/attempt_{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


def _child(local_rank: int, worker: Callable, nprocs: int, port: int, args: tuple, backend: str | None) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run_here(worker, args, backend)


def _run_here(worker: Callable, args: tuple, backend: str | None) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    init_from_env(backend)
    try:
        worker(*args)
        dist.barrier()  # let every rank finish its last collective before the group is torn down
    finally:
        dist.destroy_process_group()


def run_distributed(worker: Callable, nprocs: int, args: tuple = (), backend: str | None = None) -> None:
    """Run ``worker(*args)`` on every rank of a default process group (self-launching ``nprocs`` if needed)."""
    if launched():
        _run_here(worker, args, backend)
        return
    mp.start_processes(_child, args=(worker, nprocs, free_port(), args, backend), nprocs=nprocs,
                       start_method="spawn", join=True)
