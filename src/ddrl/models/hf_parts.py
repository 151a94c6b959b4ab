"""The three parts every diffusers family specialises: the transformer's velocity
(``HFDenoiser``), cached prompt embeddings (``TextConditioner``) and the VAE (``VAECodec``)."""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
from torch import Tensor, nn

from ddrl.errors import DDRLError
from ddrl.models.base import Cond
from ddrl.models.config import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFDenoiser(nn.Module):
    """v_θ(x_t, t, c) from a diffusers transformer; x_t [B, *sample_shape] float32, t [B] ∈ [0, 1].

    Inputs are cast to the transformer's dtype, the forward runs under the configured autocast,
    and the velocity comes back float32 so that log-probs and losses are computed in float32."""

    BLOCKS: tuple[str, ...] = ()  # the transformer's ModuleLists of blocks (FSDP2 units)

    def __init__(self, transformer: nn.Module, autocast: str = "none"):
        super().__init__()
        self.transformer = transformer
        self.autocast = autocast

    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP2 shards one by one: every block of the family's ``BLOCKS`` lists."""
        return [b for name in self.BLOCKS for b in getattr(self.transformer, name)]

    @property
    def dtype(self) -> torch.dtype:
        # diffusers' ModelMixin.dtype skips _keep_in_fp32_modules (Wan's scale_shift_table)
        tr = self.transformer
        return tr.dtype if hasattr(tr, "dtype") else next(tr.parameters()).dtype

    def forward_velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The family's call: x_t in the transformer's dtype → v = ε − x0, like x_t."""
        raise NotImplementedError

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        on = self.autocast != "none"
        dt = TORCH_DTYPES[self.autocast] if on else None
        ctx = torch.autocast(x_t.device.type, dtype=dt) if on else contextlib.nullcontext()
        with ctx:
            v = self.forward_velocity(x_t.to(self.dtype), t.expand(x_t.shape[0]), cond)
        return v.float()


class _Truncations(logging.Filter):
    """Holds back diffusers' "part of your input was truncated" lines (each repeats the cut
    text: ~10k characters for a long prompt) and keeps their reasons, to say once, briefly."""

    def __init__(self):
        super().__init__()
        self.reasons: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "was truncated because" not in msg:
            return True
        self.reasons.add(msg.split("because", 1)[1].split(":", 1)[0].strip())
        return False


@contextlib.contextmanager
def one_line_truncation_notice(what: str):
    """While inside, diffusers' truncation warnings are replaced by one short stderr line
    naming ``what`` was truncated and why (the text encoders' token limits)."""
    handlers = logging.getLogger("diffusers").handlers
    notice = _Truncations()
    for h in handlers:
        h.addFilter(notice)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(notice)
        if notice.reasons:
            why = "; ".join(sorted(notice.reasons))[:300]
            print(f"ddrl: {what} longer than the text encoders take were truncated ({why})",
                  file=sys.stderr)  # fmt: skip


class TextConditioner(nn.Module):
    """Prompt embeddings computed once per distinct prompt and kept (CPU, ``model.dtype``);
    after ``prepare`` has seen every prompt a run uses, the text encoders can be released."""

    null_prompt = ""  # the negative prompt of the pipelines' CFG

    def __init__(self, pipe, cfg: ModelConfig, encoder_names: tuple[str, ...]):
        super().__init__()
        self.pipe, self.cfg, self.encoder_names = pipe, cfg, encoder_names
        # Registered, so that ``generator.to(device)`` moves them (the pipe is not a Module).
        self.encoders = nn.ModuleDict(
            {n: getattr(pipe, n) for n in encoder_names if getattr(pipe, n, None) is not None}
        )
        self.rows: dict[str, dict[str, Tensor]] = {}
        self.shared: dict[str, Tensor] = {}
        self.released = False

    def encode_batch(self, prompts: list[str]) -> Cond:
        """The family's ``pipe.encode_prompt`` call: prompts [B] → Cond (batch B)."""
        raise NotImplementedError

    @torch.no_grad()
    def _fill(self, prompts: list[str], batch: int = 16) -> None:
        new = sorted({p for p in prompts if p not in self.rows})
        if new and self.released:
            raise DDRLError(
                f"prompt {new[0]!r} was not encoded before the text encoders were released; "
                "set model.release_text_encoders=false to encode prompts on demand"
            )
        for s in range(0, len(new), batch):
            chunk = new[s : s + batch]
            with one_line_truncation_notice(f"prompt(s) among {chunk[0][:40]!r}…"):
                c = self.encode_batch(chunk)
            self.shared = {k: v.cpu() for k, v in c.shared.items()}
            for i, p in enumerate(chunk):
                self.rows[p] = {k: v[i : i + 1].cpu() for k, v in c.batched.items()}

    def encode(self, prompts: list[str]) -> Cond:
        self._fill(prompts)
        keys = self.rows[prompts[0]].keys()
        return Cond({k: torch.cat([self.rows[p][k] for p in prompts]) for k in keys}, self.shared)

    def null(self, n: int) -> Cond:
        return self.encode([self.null_prompt] * n)

    def prepare(self, prompts: list[str]) -> None:
        """Encode ``prompts`` and the null prompt now; then free the encoders if configured."""
        self._fill([*prompts, self.null_prompt])
        if self.cfg.release_text_encoders:
            self.release()

    def release(self) -> None:
        for name in self.encoder_names:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        self.encoders = nn.ModuleDict()
        self.released = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def device(self) -> torch.device:
        for name in self.encoder_names:
            enc = getattr(self.pipe, name, None)
            if isinstance(enc, nn.Module):
                return next(enc.parameters()).device
        return torch.device("cpu")


class VAECodec(nn.Module):
    """Images [B, 3, H, W] (or videos [B, 3, F, H, W]) in [-1, 1] ↔ normalised latents
    z = (E(x) − m)·s, the latent distribution's mode (deterministic), ``batch`` items per call."""

    value_range = (-1.0, 1.0)

    def __init__(self, vae: nn.Module, mean, scale, batch: int):
        super().__init__()
        self.vae, self.batch = vae, batch
        self.register_buffer("m", torch.as_tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("s", torch.as_tensor(scale, dtype=torch.float32), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        out = []
        for x in images.split(self.batch):
            lat = self.vae.encode(x.to(self.m.device, self.dtype)).latent_dist.mode()
            out.append((lat.float() - self.m) * self.s)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        out = []
        for x in z.split(self.batch):
            lat = (x.to(self.m.device).float() / self.s + self.m).to(self.dtype)
            out.append(self.vae.decode(lat, return_dict=False)[0].float())
        return torch.cat(out)
