"""The parallel section of a run's config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal




from ddrl.errors import check_literals


@dataclass
class ParallelConfig:
    """How the denoiser is spread over torchrun's ranks (one process: ignored)."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = field(
        default="auto",
        metadata={
            "help": "auto | none | ddp | fsdp; auto: none for one process, else fsdp on CUDA and "
            "ddp on CPU (gloo)"
        },
    )
    param_dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={
            "help": "FSDP2 compute dtype of the gathered weights: auto = bfloat16 on CUDA, float32 "
            "on CPU; master weights and gradient reduction stay float32"
        },
    )
    reshard_after_forward: bool = field(
        default=True,
        metadata={
            "help": "FSDP2: free each block's gathered weights after its forward (ZeRO-3); false "
            "keeps them until the backward (fewer all-gathers, more memory)"
        },
    )

    def check(self) -> None:
        check_literals(self, "parallel.")
