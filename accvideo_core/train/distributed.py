"""torchrun / FSDP2 plumbing: process group, sharding per block, full state dicts, small collectives.

One code path: with WORLD_SIZE = 1 (plain ``python -m``) no process group is created and modules stay plain;
under ``torchrun --nproc_per_node N`` each transformer block is ``fully_shard``-ed (FSDP2), then the root.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from accvideo_core.train.config import ConfigError
from accvideo_core.utils.dtypes import FP8_DTYPES

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # we created the process group
    fsdp: bool = False
    sp: int = 1                # sequence-parallel degree: ranks rank // sp * sp ... + sp - 1 share each sample
    sp_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None  # gloo, for flags, when the default group is NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp(self) -> int:
        """Data-parallel ranks: groups of ``sp`` ranks, each group reading its own samples."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp


def init_distributed(device: str = "auto", fsdp: str = "auto", sequence_parallel: int = 1) -> DistInfo:
    """Read torchrun's environment, create the process group (NCCL on CUDA, gloo on CPU), pick the device.

    ``sequence_parallel`` > 1: the 2-D device mesh (dp, sp) of ``world / sp`` data-parallel groups of ``sp``
    consecutive ranks; ``info.sp_group`` is this rank's sequence-parallel group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)
    if world > 1:
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, **kwargs)
            info.initialized = True
        if dist.get_backend() != "gloo":  # flags go over the CPU: never queued behind FSDP's NCCL collectives
            info.control_group = dist.new_group(backend="gloo")
    if fsdp == "on" and world == 1 and not dist.is_initialized():
        raise ConfigError("runtime.fsdp = 'on' needs torchrun (WORLD_SIZE > 1); use 'auto' or 'off'")
    info.fsdp = (fsdp == "on") or (fsdp == "auto" and world > 1)
    if world > 1 and not info.fsdp:
        raise ConfigError("more than one rank needs runtime.fsdp = 'auto' or 'on' (replicated training is not "
                          "supported: FSDP2 shards the 13B student, its optimizer state and the teacher)")
    if sequence_parallel > 1:
        if world % sequence_parallel:
            raise ConfigError(f"runtime.sequence_parallel = {sequence_parallel} needs a multiple of "
                              f"{sequence_parallel} ranks (torchrun --nproc_per_node); got {world}")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world // sequence_parallel, sequence_parallel),
                                mesh_dim_names=("dp", "sp"))
        info.sp, info.sp_group = sequence_parallel, mesh.get_group("sp")
    return info


def shutdown(info: DistInfo) -> None:
    """Barrier, then destroy the process group (avoids gloo aborts at interpreter exit)."""
    if info.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_transformer(model: nn.Module, *, mesh, param_dtype: torch.dtype | None, reshard_after_forward: bool,
                      extra_methods: Iterable[str] = ()) -> nn.Module:
    """FSDP2: ``fully_shard`` every double/single block, then the root (embedders, refiner, final layer).

    ``param_dtype`` (bf16 on CUDA) becomes the MixedPrecisionPolicy with fp32 gradient reduction; ``None`` keeps
    the parameter dtype. ``extra_methods`` (e.g. ``image_features``) get the root's unshard hooks like forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # Our callers never modify a model output in place, so FSDP2's "returned a view tensor" warning is moot.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*", category=UserWarning)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"reshard_after_forward": reshard_after_forward, "mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    # no model.to(device): fully_shard moves one block at a time to the mesh device and keeps only its shard
    for block in list(model.double_blocks) + list(model.single_blocks):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for name in extra_methods:
        register_fsdp_forward_method(model, name)
    return model


_MESHES: dict[str, object] = {}


def device_mesh(device: torch.device):
    """The 1-D device mesh over all ranks on ``device``'s type (created once)."""
    if device.type not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[device.type] = init_device_mesh(device.type, (dist.get_world_size(),))
    return _MESHES[device.type]


def sum_gradients_over_sp(model: nn.Module, info: DistInfo) -> None:
    """Under sequence parallelism each rank's gradient is its share of its group's sample: FSDP2's reduce-scatter
    over all ranks then divides by ``dp`` (a mean over samples, a sum over shares), not by all ranks."""
    if info.sp == 1:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(info.dp))
            module.set_force_sum_reduction_for_comms(True)   # a plain sum, then the division (gloo has no premul)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce-scatter on all but the last micro-batch of an accumulation (no-op when not sharded)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def all_reduce_mean_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """In-place mean over ranks of a list of tensors (one flat collective)."""
    if info.world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= info.world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is set on any rank (to agree on a stop request or a checkpoint). On the CPU, over gloo:
    asked before every micro-batch, it must not wait for the GPU (an NCCL flag would queue behind FSDP's
    reduce-scatters and the ``item()`` wait for them)."""
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` (a small picklable value) on every rank."""
    if info.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module_(module: nn.Module, info: DistInfo) -> None:
    """Make a replicated module identical on every rank (rank 0's values)."""
    if info.world == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a plain or FSDP2-sharded (DTensor) one; every rank of its mesh must call it. fp8
    shards travel as bytes (gloo has no fp8 type; NCCL sends them as bytes too)."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.dtype not in FP8_DTYPES:
        return t.full_tensor()
    from torch.distributed.tensor import DTensor

    as_bytes = DTensor.from_local(t.to_local().view(torch.uint8), t.device_mesh, t.placements, shape=t.shape,
                                  stride=t.stride())
    return as_bytes.full_tensor().view(t.dtype)


def full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict on rank 0 (other ranks get ``{}``)."""
    if not info.fsdp:
        return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    """Load a full state dict (read on rank 0 only) into a plain or sharded model."""
    if not info.fsdp:
        model.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    """Optimizer state keyed by parameter names (world-size independent), full on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=info.fsdp))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                              info: DistInfo) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=info.fsdp))
