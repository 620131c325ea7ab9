"""Many processes under ``torchrun``: one process per device, each taking its rank's share.

``torchrun --nproc-per-node K [--nnodes N ...] -m ovss_cli segment|evaluate ...`` starts K
processes per machine with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`start`
joins them into a process group (NCCL when the processes run on GPUs, gloo on CPUs), and
``--device cuda`` then means the rank's own GPU, ``cuda:LOCAL_RANK``. Rank 0 prints and
writes the shared files; results are combined with collectives (confusion matrices summed,
summaries gathered). Without torchrun everything here is a no-op for a single process.
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import UsageError

_PROGRESS_KEY = "ovss/progress"


def _one_visible_device() -> bool:
    """Whether CUDA_VISIBLE_DEVICES names exactly one GPU, as schedulers (SLURM's
    ``--gpus-per-task``, ...) set it when each process gets its own: it is then ``cuda:0``
    whatever the process's local rank."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return len([d for d in visible.split(",") if d.strip()]) == 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Distributed:
    """This process's place in the run: rank ``rank`` of ``world`` (``local_rank`` on its
    machine); collectives are no-ops when ``world == 1``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_peers: list[int] = field(default_factory=list)  # process ids of the other ranks on this machine

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank runs on: ``cuda`` (or ``auto`` with GPUs) means its own GPU."""
        name = (requested or "auto").strip().lower()
        if not self.enabled or name == "cpu":
            return name
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
            count = torch.cuda.device_count()
            if count == 1 and _one_visible_device():  # the launcher gave each process its own GPU
                return "cuda:0"
            if self.local_rank >= count:
                raise UsageError(f"local rank {self.local_rank} has no GPU: this machine has {count}; start at "
                                 "most that many processes per node (or give each its own GPU through "
                                 "CUDA_VISIBLE_DEVICES)")
            return f"cuda:{self.local_rank}"
        return name

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (int64 counts stay exact)."""
        if not self.enabled:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.comm_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor.cpu().numpy()

    # progress for all ranks, shown by rank 0: a counter in the process group's key-value store
    def _store(self):
        try:
            return torch.distributed.distributed_c10d._get_default_store()
        except Exception:  # private API; without it rank 0 shows its own progress only
            return None

    def add_progress(self, done: int = 1, failed: int = 0, reused: int = 0) -> tuple[int, int, int]:
        """Count finished inputs (``failed`` and ``reused`` of them); returns the totals over all
        ranks so far (adding 0 reads them)."""
        store = self._store() if self.enabled else None
        if store is None:
            return done, failed, reused
        return tuple(int(store.add(f"{_PROGRESS_KEY}/{name}", n))  # type: ignore[return-value]
                     for name, n in (("done", done), ("failed", failed), ("reused", reused)))

    def stop(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def exit_code(self, code: int, timeout: float = 60.0) -> int:
        """``code``, once it is safe for rank 0 to exit with it: torchrun stops every process of
        a machine as soon as one exits non-zero, so rank 0 first waits (up to ``timeout`` s) for
        the other ranks on its machine, which are done but may still be shutting down; they
        would otherwise be killed and reported as failures of their own."""
        deadline = time.monotonic() + timeout
        pending = self.local_peers if code and self.is_main else []
        while pending and time.monotonic() < deadline:
            time.sleep(0.02)
            pending = [pid for pid in pending if _running(pid)]
        return code


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited one waiting to be reaped does not; without
    /proc nothing can be told, so nothing is waited for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def start(requested_device: str = "auto") -> Distributed:
    """Join the torchrun process group (a no-op single-process context otherwise)."""
    if not launched_by_torchrun():
        return Distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    ctx = Distributed(rank, world, local_rank)
    device = ctx.device(requested_device)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        ctx.backend, ctx.comm_device = "nccl", torch.device(device)
    else:
        ctx.backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(ctx.backend, timeout=_dt.timedelta(hours=2))
    host = socket.gethostname()
    ctx.local_peers = [pid for h, pid in ctx.all_gather((host, os.getpid())) if h == host and pid != os.getpid()]
    return ctx
