"""Data-parallel training under ``torchrun``: every rank holds the whole network, sees a shard of each batch, and
all ranks apply the same update.

Launch (one node, 2 processes; on GPUs ``--nproc_per_node`` = the number of GPUs, ``device: cuda``)::

    torchrun --standalone --nproc_per_node 2 -m bilevel_ssl.trainer run.yaml --out outputs/runs/my-run

:func:`bilevel_ssl.trainer.train` notices ``WORLD_SIZE > 1`` in the environment (set by torchrun) and calls
:func:`init` itself; nothing else changes in the caller.  Across nodes: ``torchrun --nnodes N --node_rank i
--rdzv_backend c10d --rdzv_endpoint HOST:PORT --nproc_per_node G ...`` on every node.

What the trainer does with a :class:`Dist` (the semantics are those of ``DistributedDataParallel``, written out
because DDP's wrapper does not compose with the functional parameter substitution of the bi-level methods):

* **Sharding and seeding.** ``batch_size`` is the *global* batch; it must divide by the world size.  Every rank
  draws the same permutation and the same augmentations for the whole global batch from the shared generator
  (seed + 1) and keeps its own contiguous shard (rank r: images r·B/W … (r+1)·B/W − 1).  So a W-process run sees
  exactly the views of the 1-process run with the same seed - the property the equivalence test relies on - for
  the price of augmenting B instead of B/W images per rank (batched tensor ops, a few % of a step).
* **Single-level objectives** (``meta: none``): each rank's outputs are all-gathered (:func:`gather_outputs`):
  the local rows keep their graph, the other ranks' rows are constants; every rank computes the loss of the
  *global* batch (contrastive negatives from all ranks, Barlow/VICReg statistics over the global batch), and its
  backward yields the contribution of its own rows.  Summing the gradients over ranks (all-reduce SUM) gives
  exactly the gradient of the global loss - no factor W, no differentiable collective needed.  The objective's
  state (MoCo queue, DINO centre) is updated from the gathered outputs, identically on every rank.
* **Bi-level methods** (GeSSL, TC², MCR, multitask): tasks are built from the local shard; each rank runs its
  inner loop on its own tasks; the outer-step (hyper)gradients are averaged (all-reduce MEAN), as in
  data-parallel MAML.  The numbers therefore differ from a 1-process run with the same global batch (the inner
  step sees fewer tasks); the ranks stay in sync.
* **BatchNorm.** ``sync_bn: true`` normalises with the statistics of the global batch (single-level only):
  :class:`torch.nn.SyncBatchNorm` on CUDA; on CPU (gloo), where torch's SyncBatchNorm refuses CPU tensors
  (``torch/nn/modules/batchnorm.py``: "SyncBatchNorm expected input tensor to be on GPU"), :class:`SyncBatchNormCPU`
  below.  Without it every rank normalises its shard, and the running statistics are broadcast from rank 0
  after each step (DDP's ``broadcast_buffers``).
* **Logs** are averaged over ranks; rank 0 alone shows progress and writes checkpoints and the encoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch import Tensor

__all__ = ["Dist", "init", "gather_outputs", "reduce_grads", "average_logs", "broadcast_buffers", "SyncBatchNormCPU",
           "convert_sync_batchnorm", "shard"]


@dataclass
class Dist:
    """The process group of this run: ``rank`` of ``world_size``; ``device`` this rank computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str) -> Dist | None:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...);
    None when ``WORLD_SIZE`` is unset or 1.  Backend: nccl for ``device: cuda`` (rank i uses GPU ``LOCAL_RANK``),
    gloo for CPU.  Joining twice is a no-op (the group of a previous :func:`train` call is reused)."""
    world = world_size_from_env()
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank, world, local_rank, dev, tdist.get_backend())


def shard(n: int, dist: Dist | None) -> slice:
    """This rank's rows of a global batch of ``n`` (contiguous, equal shards)."""
    if dist is None:
        return slice(0, n)
    per = n // dist.world_size
    return slice(dist.rank * per, (dist.rank + 1) * per)


def _gather(t: Tensor, dist: Dist) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.world_size)]
    tdist.all_gather(parts, t.detach().contiguous())
    parts[dist.rank] = t  # the local rows keep their graph; the others are constants
    return torch.cat(parts)


def gather_outputs(outs, dist: Dist | None):
    """Per-view output dicts of the local shard -> the same for the global batch (rows in rank order, i.e. the
    1-process batch order); None passes through."""
    if outs is None or dist is None:
        return outs
    return [{k: _gather(v, dist) for k, v in o.items()} for o in outs]


def reduce_grads(params, dist: Dist | None, op: str) -> None:
    """All-reduce the ``.grad`` of ``params`` over ranks: ``op`` "sum" (gradients of a gathered global loss, see
    the module docstring) or "mean" (per-rank losses: bi-level outer steps).  One flat buffer, one collective."""
    if dist is None:
        return
    if op not in ("sum", "mean"):
        raise ValueError(f"op: expected 'sum' or 'mean', got {op!r}")
    params = [p for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    tdist.all_reduce(flat)
    if op == "mean":
        flat /= dist.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def average_logs(logs: dict[str, float], dist: Dist | None) -> dict[str, float]:
    """The step's logged numbers averaged over ranks (same keys on every rank)."""
    if dist is None or not logs:
        return logs
    keys = sorted(logs)
    t = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=dist.device)
    tdist.all_reduce(t)
    return dict(zip(keys, (t / dist.world_size).tolist()))


@torch.no_grad()
def broadcast_buffers(module: nn.Module, dist: Dist | None) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank."""
    if dist is None:
        return
    for b in module.buffers():
        tdist.broadcast(b, 0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the incoming gradients over ranks (each rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        tdist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        tdist.all_reduce(g)
        return g


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, for CPU process groups (gloo).

    Train mode: mean and biased variance of each channel over every rank's rows (two all-reduces of per-channel
    sums, the variance about the global mean - the two-pass formula, not E[x²] − E[x]²), differentiable: the
    backward all-reduces the gradients of the per-channel sums, so every rank's rows receive the gradient that
    the global statistics carry - the same as one process normalising the concatenated batch.  Running statistics
    use the unbiased variance, like :class:`torch.nn.BatchNorm2d`.  Eval mode and 1 process: plain batch norm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNormCPU: expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        n = _AllReduceSum.apply(count)
        mean = _AllReduceSum.apply(x.sum(dims)) / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` -> :class:`torch.nn.SyncBatchNorm` (CUDA) or :class:`SyncBatchNormCPU`
    (CPU), keeping weights and running statistics."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNormCPU):
        new = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
