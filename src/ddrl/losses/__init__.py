"""An algorithm is a policy objective plus zero or more regularisers, each with its own typed
config (``ddrl.losses.config``); ``ddrl.losses.compose`` sums them into the one loss the loop
trains. The named algorithms are cells of that matrix (``ALGORITHMS``); ``objective=`` and
``regularisers=`` pick any other cell. Built-ins are "module:Class" strings imported on use;
"module:Class" also names a user objective or regulariser, and, as ``algorithm``, a whole user
loss class (``ddrl.losses.base.Loss``)."""

from __future__ import annotations

import dataclasses
import functools

from ddrl.errors import DDRLError, check_choice, lookup
from ddrl.losses.config import (
    AWMConfig,
    DataTermConfig,
    GRPOConfig,
    LaggingKLConfig,
    NFTConfig,
    NoObjectiveConfig,
    ReverseKLConfig,
)

OBJECTIVES = {  # objective → ("module:Class", its config class)
    "grpo": ("ddrl.losses.grpo:GRPO", GRPOConfig),
    "nft": ("ddrl.losses.nft:NFT", NFTConfig),
    "awm": ("ddrl.losses.awm:AWM", AWMConfig),
    "none": ("ddrl.losses.compose:NoObjective", NoObjectiveConfig),
}
TRANSITIONS = ("grpo",)  # objectives trained on the SDE's recorded transitions (log-probs)
ON_SAMPLES = ("reverse_kl", "lagging_kl")  # regularisers evaluated at the objective's points
REGULARISERS = {  # regulariser → ("module:Class", its config class)
    "data": ("ddrl.losses.data:DataTerm", DataTermConfig),
    "reverse_kl": ("ddrl.losses.kl:ReverseKL", ReverseKLConfig),
    "lagging_kl": ("ddrl.losses.kl:LaggingKL", LaggingKLConfig),
}
ALGORITHMS = {  # algorithm → (objective, regularisers): the named cells
    "ddrl": ("grpo", ("data",)),
    "flow_grpo": ("grpo", ("reverse_kl",)),
    "dance_grpo": ("grpo", ()),
    "grpo": ("grpo", ()),
    "mix_grpo": ("grpo", ()),
    "sft": ("none", ("data",)),
    "nft": ("nft", ("reverse_kl",)),
    "nft_data": ("nft", ("data",)),
    "awm": ("awm", ("reverse_kl", "lagging_kl")),
    "awm_data": ("awm", ("data", "lagging_kl")),
}


def parse_regularisers(text: str) -> tuple[str, ...]:
    """ "data,reverse_kl" → ("data", "reverse_kl"); "none" or "" → ()."""
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    if len(set(names)) != len(names):
        raise DDRLError(f"regularisers={text!r} names one twice; allowed: each at most once")
    return names


def cell(algorithm: str, objective: str = "", regularisers: str = "") -> tuple[str, tuple] | None:
    """(objective, regularisers) of ``algorithm`` with the given overrides ("" = the
    algorithm's); None for a whole user loss class ("module:Loss" as the algorithm)."""
    if algorithm not in ALGORITHMS:
        if ":" not in algorithm:
            check_choice("algorithm", algorithm, [*ALGORITHMS, "'module:Loss'"])
        if objective or regularisers:
            raise DDRLError(
                f"algorithm={algorithm!r} is a whole loss class; objective= and regularisers= "
                f"apply to the built-in algorithms only; allowed: {', '.join(ALGORITHMS)}"
            )
        return None
    obj, regs = ALGORITHMS[algorithm]
    obj, regs = objective or obj, parse_regularisers(regularisers) if regularisers else regs
    lone = [r for r in regs if r in ON_SAMPLES]
    if obj == "none" and lone:
        alone = ", ".join(r for r in REGULARISERS if r not in ON_SAMPLES)
        raise DDRLError(
            f"regulariser {lone[0]!r} acts on the objective's own samples, and objective='none' "
            f"has none; allowed with it: {alone}"
        )
    return obj, regs


def _part(kind: str, name: str, table: dict):
    """The class of a built-in or "module:Class" objective/regulariser (with ``Config``)."""
    target = table[name][0] if name in table else name
    cls = lookup(kind, target, {}, allowed=list(table))
    if not isinstance(cls, type) or not hasattr(cls, "Config"):
        raise DDRLError(
            f"{kind} {name!r} is not a class with a Config dataclass attribute; allowed: "
            f"{', '.join(table)} or 'module:Class' naming one"
        )
    return cls


def _config_of(kind: str, name: str, table: dict) -> type:
    return table[name][1] if name in table else _part(kind, name, table).Config


@functools.cache
def composed_config(objective: str, regularisers: tuple[str, ...]) -> type:
    """One dataclass inheriting every part's config, so ``loss.<key>`` reaches any part's knob
    and each part gets an instance of its own config class. Two parts may not share a key."""
    bases = [_config_of("objective", objective, OBJECTIVES)]
    bases += [_config_of("regulariser", r, REGULARISERS) for r in regularisers]
    owner: dict[str, str] = {}
    for b, name in zip(bases, [objective, *regularisers], strict=True):
        for f in dataclasses.fields(b):
            if f.name in owner:
                raise DDRLError(
                    f"loss.{f.name} is a setting of both {owner[f.name]!r} and {name!r}; allowed: "
                    "parts whose settings have different names"
                )
            owner[f.name] = name

    def check(self) -> None:
        for b in bases:
            b.check(self)

    label = "+".join([objective, *regularisers])
    doc = f"The loss settings of {label}: every part's own config."
    return dataclasses.make_dataclass(
        "LossConfig", [], bases=tuple(bases), namespace={"check": check, "__doc__": doc}
    )


def loss_config(algorithm: str, objective: str = "", regularisers: str = "") -> type:
    """The config class of the loss: the composed parts' (``composed_config``), or a user loss
    class's own ``Config``."""
    c = cell(algorithm, objective, regularisers)
    if c is None:
        return _plugin_loss(algorithm).Config
    return composed_config(c[0], c[1])


def _plugin_loss(algorithm: str):
    cls = lookup("algorithm", algorithm, {}, allowed=list(ALGORITHMS))
    if not isinstance(cls, type) or not hasattr(cls, "Config") or not callable(cls):
        raise DDRLError(
            f"algorithm {algorithm!r} is not a loss class with a Config dataclass attribute; "
            f"allowed: {', '.join(ALGORITHMS)} or 'module:Class' naming one"
        )
    return cls


def build_loss(algorithm: str, cfg, ctx, objective: str = "", regularisers: str = ""):
    """The loss the loop trains: the objective and regularisers, each built as cls(cfg, ctx),
    summed by ``ddrl.losses.compose.Composite``; or a user loss class built as cls(cfg, ctx)."""
    c = cell(algorithm, objective, regularisers)
    if c is None:
        return _plugin_loss(algorithm)(cfg, ctx)
    composite = lookup("loss", "ddrl.losses.compose:Composite", {})  # imported on use
    obj = _part("objective", c[0], OBJECTIVES)(cfg, ctx)
    return composite(obj, [_part("regulariser", r, REGULARISERS)(cfg, ctx) for r in c[1]])


def needs(algorithm: str, objective: str = "", regularisers: str = "") -> dict[str, bool]:
    """What the loss asks of the loop, without building it: ``data`` (a data pool),
    ``reference`` (a reference model), ``transitions`` (recorded SDE transitions)."""
    c = cell(algorithm, objective, regularisers)
    if c is None:
        cls = _plugin_loss(algorithm)
        parts = [cls]
    else:
        parts = [_part("objective", c[0], OBJECTIVES)]
        parts += [_part("regulariser", r, REGULARISERS) for r in c[1]]
    return {
        "data": any(getattr(p, "needs_data", c is None) for p in parts),
        "reference": any(getattr(p, "needs_reference", c is None) for p in parts),
        "transitions": getattr(parts[0], "transitions", True),
    }
