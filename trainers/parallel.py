"""Sharded data parallelism (FSDP2) for `hqdm fit`: the `FSDP` strategy and the sharding of the student.

    trainer:
      strategy: hqdm_fsdp     # or {class_path: hqdm.trainers.FSDP, init_args: {shard_teacher: true}}
      devices: 2

`FSDP` is Lightning's ModelParallelStrategy set up for data parallelism alone: every process is one data-parallel
rank (no tensor parallelism), and checkpoints are one file holding the full state (gathered on rank 0), which
`hqdm export`, `hqdm sample` and a resume on any number of processes read like any other checkpoint of `hqdm fit`.
Lightning's folder checkpoints of sharded state (torch.distributed.checkpoint) are refused: their metadata is a
pickle, and hqdm unpickles no file.

The student is sharded per layer (every Linear / Conv, quantized or not: `shard_units`), then as a whole; the
frozen teacher is replicated (or sharded the same way with `shard_teacher`). Learned step sizes and per-timestep
tables are parameters and are sharded with the weights; buffers (μ / σ, flags) are replicated. Calibration runs
before the student is sharded and all-reduces its statistics, so every rank starts from the state one process
calibrates on all the ranks' batches (`hqdm.calibrate`).
Lightning's FSDPStrategy (FSDP1) is refused: it flattens parameters, which calibration and the quantizers cannot
read between steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn

SHARDED_CHECKPOINT = (
    "is a folder of sharded state (torch.distributed.checkpoint); its metadata is a pickle, which hqdm does not "
    "load. Point at a checkpoint file: `hqdm fit` with hqdm.trainers.FSDP writes the full state into one .ckpt "
    "file, which resumes on any number of processes."
)


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2 through Lightning's ModelParallelStrategy) for DistillModule.

    Args:
        shard_teacher: shard the frozen teacher as the student is (saves its memory on every rank, costs an
            all-gather per layer in each teacher forward); False (default) replicates it.
        reshard_after_forward: free each block's gathered parameters after its forward (FSDP's default; False
            keeps them until the backward: faster, more memory).
        process_group_backend: torch.distributed backend (None: NCCL on GPUs, gloo on the CPU).
    """

    strategy_name = "hqdm_fsdp"

    def __init__(self, shard_teacher: bool = False, reshard_after_forward: bool = True,
                 process_group_backend: str | None = None) -> None:
        for name, value in (("shard_teacher", shard_teacher), ("reshard_after_forward", reshard_after_forward)):
            if not isinstance(value, bool):
                raise ValueError(f"FSDP {name}={value!r} must be true or false.")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend)
        self.shard_teacher = shard_teacher
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process is a data-parallel rank
        self._tensor_parallel_size = 1
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """The full-state checkpoint file, loaded into the sharded student and optimizer (any number of ranks).

        The teacher is not in checkpoints (DistillModule rebuilds it from its source), so its keys are the only
        ones allowed to be missing; any other difference is refused, as a strict load would."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise ValueError(f"--ckpt_path {path} {SHARDED_CHECKPOINT}")
        from hqdm.trainers.module import TEACHER

        keys = set(torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"])
        expected = {k for k in self.lightning_module.state_dict() if not k.startswith(TEACHER)}
        if keys != expected:
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            raise ValueError(
                f"--ckpt_path {path} does not hold this student's state: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all). Resume with "
                "the options the checkpoint was trained with."
            )
        strict = self.lightning_module.strict_loading
        self.lightning_module.strict_loading = False  # the teacher's keys; the others were compared above
        try:
            return super().load_checkpoint(path, weights_only=True)
        finally:
            self.lightning_module.strict_loading = strict


StrategyRegistry.register(FSDP.strategy_name, FSDP, description="hqdm: FSDP2 data parallelism, full-state checkpoints")


def refuse_fsdp1(strategy) -> None:
    """Lightning's FSDPStrategy flattens the parameters hqdm's quantizers and calibration read: refuse it."""
    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "trainer.strategy=fsdp (Lightning's FSDPStrategy, FSDP1) flattens the student's parameters, which "
            "calibration and the quantizers read between steps; use hqdm's FSDP2 strategy"
            ": --trainer.strategy hqdm_fsdp (in Python: hqdm.trainers.FSDP())."
        )


SHARD_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
"""The modules sharded apart (quantized layers are Linear / Conv2d subclasses): their weights are used inside their
own forward alone, so each is gathered right where it is needed, whichever module calls it. (A block is not a safe
unit: diffusers' DiT calls block 0's timestep embedding from the model's forward, outside the block's.)"""


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards apart: every Linear / Conv layer (quantized or not), then `model` itself (the rest:
    norms, embedding tables, positional parameters)."""
    return [m for m in model.modules() if m is not model and isinstance(m, SHARD_TYPES)] + [model]


def shard(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """`fully_shard` each of `shard_units(model)`: the layers, then the model (FSDP2 shards what a module holds
    outside its already sharded children)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model`'s parameters are DTensors (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
