"""Process groups, sharding and shuffle BN: every ``torch.distributed`` concern lives here.

Everything works without ``torch.distributed`` being initialised: one process is a world of
one, where gathers are identities and the shuffle is a permutation of the local batch (pair it
with split BN). Under ``torchrun`` the process group comes from its environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), the key batch is
gathered, permuted with a permutation shared by all ranks, encoded in slices and restored to
the original order, and every rank enqueues the keys of all ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from moco.errors import ConfigError


class DistributedFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or the group never formed."""


class ReplicasOutOfSync(RuntimeError):
    """State that must be identical on every rank (queue, weights) differs between ranks."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


# --- the process group -----------------------------------------------------------------------
def launched_with_several_processes() -> bool:
    """True under ``torchrun`` (or any launcher setting the env:// variables) with WORLD_SIZE > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the group torchrun describes: NCCL for CUDA devices, gloo on CPU.

    ``timeout_s`` bounds every collective: a rank that died or hangs makes the others raise
    instead of waiting forever (NCCL aborts through its watchdog after the same time).
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if device.index is None or device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: LOCAL_RANK={local_rank()} needs GPU {device.index}, but only "
                              f"{torch.cuda.device_count()} are visible; use --nproc_per_node <= the GPUs per node")
        torch.cuda.set_device(device)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedFailure(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                                 "launch with torchrun (see docs/distributed.md)")
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise DistributedFailure(f"could not join the process group ({backend}, {_first_line(err)}); "
                                 f"waited up to train.dist_timeout_s={timeout_s:g} s") from err


@contextlib.contextmanager
def process_group(device: torch.device, timeout_s: float) -> Iterator[None]:
    """Run the body inside torchrun's process group; a no-op on one process or in a group the
    caller already made. The group is destroyed on the way out, also after an error.

    A failing collective (a rank died or timed out) is re-raised as :class:`DistributedFailure`
    with a message that says so.
    """
    owns = launched_with_several_processes() and not is_distributed()
    if owns:
        init_process_group(device, timeout_s)
    try:
        yield
    except Exception as err:
        if is_distributed() and world_size() > 1 and _is_communication_error(err):
            raise DistributedFailure(
                f"rank {rank()} of {world_size()}: a collective failed, so another process died or did not "
                f"answer within train.dist_timeout_s={timeout_s:g} s; see the other ranks' logs "
                f"({_first_line(err)})") from err
        raise
    finally:
        if owns and is_distributed():
            dist.destroy_process_group()


_COMM_ERROR = re.compile(r"gloo|nccl|connection (reset|closed)|broken pipe|watchdog", re.I)


def _is_communication_error(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and bool(_COMM_ERROR.search(str(err))))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _comm_device() -> torch.device:
    """Where collective buffers must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- global batch and data -------------------------------------------------------------------
def local_batch_size(global_batch: int) -> int:
    """``optim.batch_size`` is the global batch; each rank takes an equal share of it."""
    world = world_size()
    if global_batch % world:
        raise ConfigError(f"optim.batch_size: the global batch {global_batch} must be divisible by the "
                          f"{world} processes")
    return global_batch // world


def bn_splits_per_process(bn_splits: int) -> int:
    """``model.bn_splits`` counts BN groups in the *global* batch, so a config keeps its BN batch
    (global batch / bn_splits) on any number of processes: 8 splits on one GPU, 1 on each of 8.
    Each process normalises at least its own slice, so fewer splits than processes give 1 each.
    """
    world = world_size()
    if bn_splits <= world:
        return 1
    if bn_splits % world:
        raise ConfigError(f"model.bn_splits: {bn_splits} BN groups cannot be shared evenly by {world} processes; "
                          f"use a multiple of {world}")
    return bn_splits // world


def shard(dataset: Any) -> Any:
    """This rank's strided share of ``dataset`` (rank, rank + world, ...); all of it on one process."""
    if world_size() == 1:
        return dataset
    indices = torch.arange(rank(), len(dataset), world_size())
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    return torch.utils.data.Subset(dataset, indices.tolist())


# --- collectives on values -------------------------------------------------------------------
@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (no gradient); identity on one process."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGradients(torch.autograd.Function):
    """all_gather whose backward returns each rank the gradient of *every* rank's loss with
    respect to its own rows (an all-reduce of the gathered gradient, then this rank's slice)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def all_gather_with_gradients(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, gradients flowing back to every rank's
    rows (SimCLR's negatives from other processes); identity on one process. With DDP's gradient
    averaging, training equals one process with the whole batch when every rank's loss is the
    mean over its own rows."""
    if not is_distributed():
        return tensor
    return _GatherWithGradients.apply(tensor)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it); unchanged on one process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait until every rank is here (e.g. until rank 0 has written a file the others read)."""
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over ranks, in place (and returned); unchanged on one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank when ranks hold different numbers of rows."""
    if not is_distributed():
        return tensor
    device = _comm_device()
    size = torch.tensor([tensor.shape[0]], device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, sizes)]).to(tensor.device)


@torch.no_grad()
def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-rank tensor over ranks: per-rank losses of equal slices -> the global loss."""
    if not is_distributed():
        return value
    total = value.detach().to(_comm_device(), torch.float64, copy=True)
    dist.all_reduce(total)
    return (total / world_size()).to(value.device, value.dtype)


def max_over_ranks(value: int) -> int:
    """The largest of a per-rank integer, e.g. "has any rank received a stop signal?"."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def weighted_mean_over_ranks(value: float, weight: float) -> float:
    """``sum(value_r * weight_r) / sum(weight_r)``: e.g. accuracies of shards of different sizes."""
    if not is_distributed():
        return value
    pair = torch.tensor([value * weight if weight else 0.0, weight], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(pair)
    return float(pair[0] / pair[1])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order; ``[obj]`` on one process.

    ``obj`` travels as ``torch.save`` bytes and is read back with ``weights_only=True``, so it may
    hold tensors and plain containers (like a checkpoint), and no pickled code runs.
    """
    if not is_distributed():
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


@torch.no_grad()
def computed_on_main_process(compute: Callable[[], Any], failure: str) -> Any:
    """``compute()`` run on rank 0 only and its result handed to every rank: work done once (decoding
    a sample of the data), through :func:`all_gather_objects`. When it fails on rank 0 every rank
    raises instead of waiting for a result that never comes: rank 0 its own error, the others the
    same one-line ``ConfigError`` when it was one (a user's error), else a RuntimeError that starts
    with ``failure`` and names rank 0's error."""
    result, error = None, None
    if is_main_process():
        try:
            result = compute()
        except Exception as raised:
            if not is_distributed():
                raise
            error = raised
    result_of_rank0, error_of_rank0 = all_gather_objects(
        (result, None if error is None else (type(error).__name__, str(error))))[0]
    if error is not None:
        raise error
    if error_of_rank0 is not None:
        kind, message = error_of_rank0
        if kind == ConfigError.__name__:
            raise ConfigError(message)
        raise RuntimeError(f"{failure} ({kind}: {message})")
    return result_of_rank0


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, e.g. before evaluation."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        staged = buffer.to(_comm_device())
        dist.broadcast(staged, src=0)
        buffer.copy_(staged)


@torch.no_grad()
def assert_same_on_all_ranks(tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ReplicasOutOfSync` on every rank if any named tensor differs between ranks.

    Compares two float64 checksums per tensor (the sum, and a position-weighted sum that also
    catches reordering), so the check costs one small all-gather.
    """
    if not is_distributed():
        return
    rows = []
    for value in tensors.values():
        flat = value.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64) / flat.numel()
        rows.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    mine = torch.stack(rows).to(_comm_device())
    everyone = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(everyone, mine)
    names = list(tensors)
    bad = sorted({(names[i], r) for r, other in enumerate(everyone)
                  for i in torch.nonzero((other != everyone[0]).any(dim=1)).flatten().tolist()})
    if bad:
        listed = ", ".join(f"{name} on rank {r}" for name, r in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ReplicasOutOfSync(f"rank {rank()}: state differs from rank 0's: {listed}")


# --- models ------------------------------------------------------------------------------------
def convert_sync_bn(module: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    """With ``enabled`` under several processes, BN layers use statistics of the global batch.

    On one process plain BN already sees the whole batch, so nothing changes. PyTorch's
    SyncBatchNorm runs on GPUs only, so asking for it on CPU ranks is an error.
    """
    if not enabled or world_size() == 1:
        return module
    if device.type == "cpu":
        raise ConfigError("model.sync_bn: PyTorch's SyncBatchNorm needs GPUs; leave it off for CPU (gloo) runs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


# --- shuffle BN --------------------------------------------------------------------------------
@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle a batch for shuffle BN; returns this rank's shuffled slice and the unshuffle index.

    Across processes every rank receives a slice drawn from all ranks' samples, so its BN
    statistics mix samples of other ranks (the reference's ``_batch_shuffle_ddp``).
    """
    if not is_distributed():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    local = x.shape[0]
    x_all = concat_all_gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    this_rank = perm.view(world_size(), local)[rank()]
    return x_all[this_rank], idx_unshuffle


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shuffle_batch` on the encoded slice: this rank's samples, original order."""
    if not is_distributed():
        return y[idx_unshuffle]
    local = y.shape[0]
    y_all = concat_all_gather(y)
    this_rank = idx_unshuffle.view(world_size(), local)[rank()]
    return y_all[this_rank]


@torch.no_grad()
def encode_with_shuffle_bn(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Encode ``x`` in shuffled order and return outputs in the original order."""
    shuffled, idx_unshuffle = shuffle_batch(x)
    return unshuffle_batch(encoder(shuffled), idx_unshuffle)
