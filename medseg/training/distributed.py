"""Several processes training one model: the ranks, their process group and what they agree on.

``torchrun --nproc_per_node N -m medseg train ...`` starts N copies of ``medseg train``. The command
line reads torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` once (:meth:`Ranks.from_torchrun`,
the torch.distributed launch contract, not medseg configuration) and passes a :class:`Ranks` down;
the training loop never looks at the environment. Within the run:

* the process group uses NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on the
  CPU; its rendezvous (``MASTER_ADDR``/``MASTER_PORT``) is torchrun's, read by torch itself;
* the network is wrapped in ``DistributedDataParallel``: gradients are averaged over the ranks,
  so every rank holds the same weights and optimizer state after every step;
* rank 0 decides everything that depends on the wall clock -- the learning rate, "stop now" -- and
  broadcasts it (:func:`agree`), so every rank runs the same number of iterations and no rank waits
  forever in an all-reduce the others have left;
* validation, checkpoints, history and the progress bar belong to rank 0; the others wait at a
  barrier meanwhile.

Without torchrun (``ranks=None``) none of this happens and training is the single-process loop.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medseg.errors import MedsegUserError

__all__ = ["Ranks", "agree", "barrier", "data_parallel", "mean_over_ranks", "process_group", "rank_device"]

# validation and checkpoints on rank 0 can take minutes while the other ranks wait at a barrier;
# torch's defaults (10 min for NCCL) would end a long validation run for nothing.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes training one model.

    Attributes:
        world_size: processes in the run (all nodes together).
        rank: this process, ``0 .. world_size - 1``; rank 0 validates and writes.
        local_rank: this process on its node; on CUDA it uses ``cuda:local_rank``.
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise MedsegUserError(
                f"distributed ranks make no sense: rank {self.rank}, local rank {self.local_rank}, "
                f"world size {self.world_size}"
            )

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, checkpoints and reports."""
        return self.rank == 0

    @classmethod
    def from_torchrun(cls, environment: Mapping[str, str]) -> Ranks | None:
        """The ranks torchrun gave this process (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), or None outside torchrun.

        Args:
            environment: the process environment (``os.environ``), passed in by the command line.
        """
        if "WORLD_SIZE" not in environment:
            return None
        try:
            world_size = int(environment["WORLD_SIZE"])
            rank = int(environment.get("RANK", "0"))
            local_rank = int(environment.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise MedsegUserError(f"torchrun's WORLD_SIZE/RANK/LOCAL_RANK are not integers: {error}") from None
        return cls(world_size=world_size, rank=rank, local_rank=local_rank)


def rank_device(device: torch.device, ranks: Ranks | None) -> torch.device:
    """The device of this rank: ``cuda:local_rank`` on CUDA (one GPU per process), else ``device`` itself."""
    if ranks is None or device.type != "cuda":
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise MedsegUserError(
            f"local rank {ranks.local_rank} needs GPU {ranks.local_rank}, but torch sees "
            f"{torch.cuda.device_count()}; start at most that many processes per node (--nproc_per_node)"
        )
    return torch.device("cuda", ranks.local_rank)


@contextmanager
def process_group(ranks: Ranks | None, *, device: torch.device) -> Iterator[None]:
    """Join the run's process group (NCCL on CUDA, gloo on the CPU) for the ``with`` block; no-op without ranks.

    The rendezvous address is torchrun's (``init_method="env://"``). A group that is already
    initialised (by a caller embedding medseg) is used as it is and left open.
    """
    if ranks is None or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method="env://",
        world_size=ranks.world_size,
        rank=ranks.rank,
        timeout=COLLECTIVE_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def agree(values: Sequence[float], *, ranks: Ranks | None, device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every rank (a broadcast); ``values`` unchanged without ranks."""
    if ranks is None:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return [float(v) for v in tensor.tolist()]


def mean_over_ranks(value: float, *, ranks: Ranks | None, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (an all-reduce); ``value`` itself without ranks."""
    if ranks is None:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / ranks.world_size


def barrier(ranks: Ranks | None) -> None:
    """Wait until every rank arrives (while rank 0 validates and writes); no-op without ranks."""
    if ranks is not None:
        dist.barrier()


def data_parallel(network: torch.nn.Module, *, ranks: Ranks | None, device: torch.device) -> torch.nn.Module:
    """``network`` wrapped in ``DistributedDataParallel`` when several ranks train it (else itself).

    Every rank then starts from rank 0's weights (DDP broadcasts them) and averages its gradients.
    DDP's gradient buckets copy each parameter's strides, and the backward pass gives 1x1 kernels
    contiguous gradients: those kernels get contiguous strides first (the same memory either way).
    A network with ``find_unused_parameters = True`` (a detector whose heads skip empty batches)
    tells DDP so.
    """
    if ranks is None:
        return network
    from torch.nn.parallel import DistributedDataParallel

    for parameter in network.parameters():
        if parameter.dim() > 2 and all(n == 1 for n in parameter.shape[2:]):
            parameter.data = parameter.data.clone(memory_format=torch.contiguous_format)
    return DistributedDataParallel(
        network,
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=bool(getattr(network, "find_unused_parameters", False)),
    )
