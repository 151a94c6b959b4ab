"""How the trained denoiser is spread over ranks: torch DDP or FSDP2, behind one small object.

- ``none``: one process, the denoiser as it is.
- ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` around the denoiser's velocity
  (bucketed all-reduce overlapped with the backward). Every rank keeps the whole model.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block (each
  child of a ``*blocks`` ModuleList) and on the root, with a mixed-precision policy (bf16
  compute on CUDA, float32 master weights and gradient reduction); ``velocity`` is registered
  as an FSDP forward method so the root's parameters are gathered for it. The Flow-GRPO frozen
  copy is sharded the same way; under LoRA the reference is the adapter-disabled base itself.

Both reduce gradients by SUM, not the usual mean: each rank's loss is already its share of
the whole iteration's mean (``ddrl.training.step.optimizer_step``), so the sum is the one-process
gradient. Gradients are synchronised once per optimizer step: every backward but the step's
last runs under ``no_sync`` (DDP) / ``set_requires_gradient_sync(False)`` (FSDP2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ddrl.dist.group import group_up, world_size
from ddrl.errors import DDRLError, check_choice

PARAM_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}




def resolve_strategy(cfg: ParallelConfig, device: torch.device | str) -> str:
    """The strategy this run uses (``auto`` decided); a one-line error when it cannot run."""
    if cfg.strategy == "auto":
        if world_size() == 1:
            return "none"
        return "fsdp" if str(device).startswith("cuda") else "ddp"
    if cfg.strategy != "none" and not group_up():
        raise DDRLError(
            f"parallel.strategy={cfg.strategy} needs torchrun (also for one GPU: torchrun "
            "--standalone --nproc_per_node=1 -m ddrl train ...); allowed without it: auto, none"
        )
    return cfg.strategy


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: those the denoiser names (``shard_units()``, each
    family's own), else every child of a ModuleList whose name ends with "blocks" (a plugin)."""
    named = getattr(module, "shard_units", None)
    if callable(named):
        return list(named())
    units = []
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks"):
            units.extend(m)
    return units


class _Velocity(nn.Module):
    """DDP wraps ``forward``; the loop calls ``velocity``: this routes one to the other."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.inner = denoiser

    def forward(self, x_t, t, cond):
        return self.inner.velocity(x_t, t, cond)


def _sum_hook(state, bucket):
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DDPDenoiser:
    """The denoiser whose ``velocity`` runs through torch DDP; everything else is the module's."""

    def __init__(self, denoiser: nn.Module):
        from torch.nn.parallel import DistributedDataParallel

        self.module = denoiser
        self.ddp = DistributedDataParallel(_Velocity(denoiser), broadcast_buffers=False)
        self.ddp.register_comm_hook(None, _sum_hook)

    def velocity(self, x_t, t, cond):
        return self.ddp(x_t, t, cond)

    def __getattr__(self, name):
        return getattr(self.module, name)


class Parallel:
    """Wraps the denoiser for the loss (``wrap``), shards frozen copies (``frozen``), and
    decides per backward whether gradients are synchronised (``sync``)."""

    def __init__(self, cfg: ParallelConfig, device: torch.device | str):
        self.cfg, self.device = cfg, torch.device(device)
        self.strategy = resolve_strategy(cfg, device)
        self.sharded = self.strategy == "fsdp"
        self._wrapped = None

    def _fsdp(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        dtype = PARAM_DTYPES[self.cfg.param_dtype]
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp, "reshard_after_forward": self.cfg.reshard_after_forward}
        for unit in shard_units(module):
            fully_shard(unit, **kw)
        fully_shard(module, **kw)
        register_fsdp_forward_method(module, "velocity")
        return module

    def frozen(self, module: nn.Module) -> nn.Module:
        """A frozen copy (the Flow-GRPO reference) laid out like the policy."""
        return self._fsdp(module) if self.sharded else module

    def wrap(self, denoiser: nn.Module):
        """What the loss calls ``velocity`` on. FSDP2 shards ``denoiser`` in place (build the
        optimizer after this: its parameters become DTensors)."""
        if self.strategy == "ddp":
            self._wrapped = DDPDenoiser(denoiser)
        elif self.sharded:
            self._wrapped = self._fsdp(denoiser)
            from torch.distributed.fsdp import FSDPModule

            for m in denoiser.modules():  # per FSDP unit: these setters do not recurse
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)  # sum (see the module docstring)
                    m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        else:
            self._wrapped = denoiser
        return self._wrapped

    @contextlib.contextmanager
    def sync(self, now: bool):
        """Gradients of the backward in this block are reduced across ranks only if ``now``."""
        if self.strategy == "ddp" and not now:
            with self._wrapped.ddp.no_sync():
                yield
            return
        if self.sharded:
            self._wrapped.set_requires_gradient_sync(now)
        yield

    @staticmethod
    def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of a sharded module as full CPU tensors on rank 0 ({} on
        the others); a collective."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(module, options=opts)
        # One CPU rank: the "full" tensor is the shard itself. Copy those, or a later change
        # of the parameters (leaving the EMA weights' context) would show through.
        live = {
            p.to_local().untyped_storage().data_ptr()
            for p in module.parameters()
            if hasattr(p, "to_local")
        }
        return {
            k: v.clone() if v.untyped_storage().data_ptr() in live else v for k, v in full.items()
        }

    @staticmethod
    def unshard_into(module: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Replace a sharded module's DTensor parameters by plain ones holding ``full`` (rank 0,
        at the end of a run: the generator then saves like an unsharded one)."""
        for name, value in full.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if leaf in owner._parameters:
                old = owner._parameters[leaf]
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = value
            else:
                raise DDRLError(f"cannot place {name} back into the model")


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (a DTensor under FSDP2)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
