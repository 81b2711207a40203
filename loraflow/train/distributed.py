"""Data-parallel gate training: process setup from torchrun's environment, the data order, gradient sync, FSDP2.

Why no `DistributedDataParallel`: the only trainable tensors are the gates (262,208 floats for Llama-2-7B, k = 2).
After the micro-batches of an optimizer step, `all_reduce_gate_grads` sums their gradients across processes in
one flat all-reduce, with the step's summed training loss riding along. Summing (DDP would average) is what the
token-normalised loss needs (each process divides by the *global* number of response tokens of the step), there is
one collective per optimizer step instead of one per micro-batch (no `no_sync()` juggling), and the same code
path serves FSDP, where the gates are kept out of sharding (`ignored_params`) and stay plain replicated tensors.

Data order: epoch e visits `randperm(N, seed + e)`; optimizer step s takes the next `total_batch` indices, and
micro-batch m of rank r takes every (world × grad_accum)-th of them from slot m × world + r. The examples of an
optimizer step are therefore the same whatever the split into processes and micro-batches, which is what makes
2 processes × batch 2, 1 × 4 and 1 × 2 × grad_accum 2 give the same gates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from loraflow.errors import LoraflowError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment): nccl on CUDA, gloo on CPU. Without torchrun: one process, no process group."""
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise LoraflowError(f"device {device} asked for, but this torch sees no CUDA GPU (torch.cuda.is_available() "
                            "is False); use --device cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if ":" in device and "RANK" in os.environ:
        raise LoraflowError(f"--device {device}: under torchrun each process takes its local rank's GPU; use "
                            "--device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if use_cuda:
        index = int(device.split(":")[1]) if ":" in device else local_rank  # cuda:N: one process on GPU N
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if "RANK" not in os.environ:  # plain `python -m loraflow.cli train`
        return DistInfo(0, 1, 0, dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gate_grads(params: list[torch.nn.Parameter], extra: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of `params` over processes (in place) in one flat all-reduce; `extra` (a 1-D float
    tensor, e.g. the loss sum) is summed along and returned."""
    if not (dist.is_available() and dist.is_initialized()):
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [extra.float().to(grads[0].device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[offset:]


def broadcast_params(params: list[torch.nn.Parameter], src: int = 0) -> None:
    """Make every process start from rank `src`'s values (one flat broadcast)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=src)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


# ------------------------------------------------------------------------------------------------------ data order
def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of `epoch`: a permutation fixed by (seed, epoch), identical on every process."""
    gen = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=gen).tolist()


def step_batches(order: list[int], total_batch: int) -> list[list[int]]:
    """The epoch's optimizer steps, `total_batch` examples each (the last may be shorter)."""
    return [order[i:i + total_batch] for i in range(0, len(order), total_batch)]


def micro_batches(step: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's `grad_accum` micro-batches of one optimizer step (round-robin slots; some may be empty in a
    short last step)."""
    slots = world_size * grad_accum
    return [step[m * world_size + rank::slots] for m in range(grad_accum)]


# ------------------------------------------------------------------------------------------------------------ FSDP
def meta_base_model(source: str, dtype: torch.dtype):
    """The base model `source` built from its config on the meta device: shapes only, no weights read or held."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _receive_weights(model, full: dict, info: DistInfo) -> None:
    """Fill every rank's parameters from rank 0's whole tensors (`full`, empty elsewhere), one tensor at a time so
    that no rank holds more than one whole tensor beyond its shards. FSDP2 shards dim 0 as `torch.chunk` does."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters():
        whole = full[name].to(info.device) if info.master else torch.empty(
            param.shape, dtype=param.dtype, device=info.device)
        dist.broadcast(whole, src=0)
        with torch.no_grad():
            if isinstance(param, DTensor):
                local = param.to_local()
                chunks = torch.chunk(whole, info.world_size, dim=0)
                part = chunks[info.rank] if info.rank < len(chunks) else whole[:0]
                if local.shape != part.shape:
                    raise RuntimeError(f"--fsdp: shard of {name} is {tuple(local.shape)}, expected {tuple(part.shape)}")
                local.copy_(part)
            else:
                param.copy_(whole)
        del whole


def shard_fsdp(flow, info: DistInfo) -> None:
    """FSDP2: shard each decoder layer, then the root, over all processes; the gates stay whole (ignored).

    Rank 0 holds the whole FlowModel on the CPU (or on `info.device`); the other ranks hold it on the meta device
    (`meta_base_model`: no weights in their RAM). After `fully_shard` (which moves rank 0's shards to the mesh's
    device) the other ranks allocate their shards (`to_empty`) and receive them from rank 0 tensor by tensor, then
    every buffer (rotary tables and the like, which no state dict holds) is broadcast from rank 0. So host memory is
    one whole model (rank 0) plus one shard per other rank, not a whole model per process.

    The frozen parameters have no gradients, so FSDP only all-gathers weights (forward, and again in backward to
    pass activation gradients down to earlier gates); the gate gradients are summed by `all_reduce_gate_grads`
    like in the unsharded case.
    """
    if not info.enabled:
        raise LoraflowError("--fsdp needs a process group: start the run with torchrun (scripts/train.sh FSDP=1)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    on_meta = [name for name, p in flow.model.named_parameters() if p.device.type == "meta"]
    if info.master and on_meta:
        raise LoraflowError(f"--fsdp: rank 0 must hold the loaded weights, but {on_meta[0]} is on the meta device")
    full = dict(flow.model.state_dict()) if info.master else {}  # rank 0's whole weights, kept until sent
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    gates = set(flow.gate_parameters())
    for layer in flow.layers():
        fully_shard(layer, mesh=mesh, ignored_params=gates)
    fully_shard(flow.model, mesh=mesh, ignored_params=gates)
    if not info.master:
        flow.model.to_empty(device=info.device)  # this rank's shards (and the gates, buffers), uninitialised
    _receive_weights(flow.model, full, info)
    del full
    for gate in flow.gates():  # ignored parameters are not moved by fully_shard
        gate.to(info.device)
    for _, buffer in flow.model.named_buffers():  # non-persistent buffers are in no state dict
        dist.broadcast(buffer, src=0)
