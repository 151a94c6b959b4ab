"""The reward and gold sections of a run's config, and the parsing of their lists (torch-free)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from ddrl.errors import DDRLError, check_literals, check_range


def parse_names(name: str) -> list[str]:
    """ "ocr,clipscore" → ["ocr", "clipscore"] (a "module:attr" name has no comma)."""
    names = [n.strip() for n in name.split(",") if n.strip()]
    if not names:
        raise DDRLError(f"reward.name={name!r} is empty; give a reward name (or several, a,b)")
    return names


def parse_weights(weights: str, n: int) -> list[float]:
    """reward.weights ("1,0.5"; "" = all 1) → n floats, each ≥ 0, not all 0."""
    if not weights.strip():
        return [1.0] * n
    try:
        out = [float(w) for w in weights.split(",")]
    except ValueError:
        raise DDRLError(f"reward.weights={weights!r}: give comma-separated numbers") from None
    if len(out) != n or any(not w >= 0 for w in out) or not any(out):
        raise DDRLError(
            f"reward.weights={weights!r}: need {n} non-negative numbers (one per reward in "
            "reward.name), not all 0"
        )
    return out


def check_url(url: str) -> None:
    """A `ddrl reward-server` address: http(s)://HOST[:PORT], no query or fragment."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DDRLError(f"reward.url={url!r}; allowed: http://HOST:PORT of a `ddrl reward-server`")
    if parts.query or parts.fragment:
        raise DDRLError(f"reward.url={url!r} has a query or fragment; allowed: none")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise DDRLError(f"reward.url={url!r} has a bad port; allowed: 1..65535") from None


JUDGE_TEMPLATES = ("score", "ocr")  # built-in prompt templates (texts in ddrl.rewards.vlm_judge)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class JudgeConfig:
    """reward.name = "vlm_judge": a vision-language model served with the OpenAI chat API (vLLM,
    SGLang) scores each image; reward.url is the API base (http://host:8000/v1) and
    reward.timeout / retries / backoff apply to each request."""

    model: str = field(
        default="",
        metadata={"help": "served model name sent with each request (vLLM's --served-model-name)"},
    )
    template: str = field(
        default="score",
        metadata={
            "help": '"score": ask for 0-10 on prompt match and quality; "ocr": ask to transcribe, '
            "scored by similarity to the prompt's quoted text; or a text with {prompt}"
        },
    )
    pattern: str = field(
        default="",
        metadata={
            "help": 'regex whose group 1 is a score in the answer; "" = any number that is not a '
            'denominator ("7/10" gives 7)'
        },
    )
    matches: Literal["last", "mean"] = field(
        default="last",
        metadata={
            "help": "which matches of pattern make the score: the last one, or the mean of all "
            "(several criteria, e.g. UnifiedReward's three)"
        },
    )
    scale_min: float = field(
        default=0.0, metadata={"help": "judge score that maps to reward 0 (clamped below)"}
    )
    scale_max: float = field(
        default=10.0, metadata={"help": "judge score that maps to reward 1 (clamped above)"}
    )
    max_tokens: int = field(default=512, metadata={"help": "answer tokens at most (max_tokens)"})
    temperature: float = field(
        default=0.0, metadata={"help": "sampling temperature of the answer (0 = greedy)"}
    )
    concurrency: int = field(
        default=8, metadata={"help": "requests in flight at once (one per image)"}
    )
    api_key_env: str = field(
        default="",
        metadata={
            "help": 'environment variable holding the bearer key sent to the server; "" = none'
        },
    )
    image_size: int = field(
        default=0,
        metadata={"help": "longest image side in pixels sent to the judge (resized); 0 = as is"},
    )
    unparsable: Literal["error", "nan"] = field(
        default="error",
        metadata={
            "help": 'an answer the pattern does not match: "error" stops the run; "nan" skips '
            "the sample's group"
        },
    )

    def check(self) -> None:
        p = "reward.judge."
        check_literals(self, p)
        if self.template not in JUDGE_TEMPLATES and "{prompt}" not in self.template:
            raise DDRLError(
                f"{p}template={self.template[:80]!r} has no {{prompt}}; allowed: "
                f"{', '.join(JUDGE_TEMPLATES)} or a text containing {{prompt}}"
            )
        if self.pattern:
            try:
                groups = re.compile(self.pattern).groups
            except re.error as e:
                raise DDRLError(f"{p}pattern={self.pattern!r} is not a regex: {e}") from None
            if groups < 1:
                raise DDRLError(
                    f"{p}pattern={self.pattern!r} has no group; allowed: a regex whose group 1 "
                    r"is the score, e.g. 'Score: (\d+)'"
                )
            if self.template == "ocr":
                raise DDRLError(
                    f"{p}pattern={self.pattern!r} with template ocr, which scores the whole "
                    'transcription; allowed: pattern="" with ocr'
                )
        check_range(p + "scale_min", self.scale_min, -1e12, 1e12)
        check_range(p + "scale_max", self.scale_max, -1e12, 1e12)
        if not self.scale_max > self.scale_min:
            raise DDRLError(
                f"{p}scale_max={self.scale_max!r} <= scale_min={self.scale_min!r}; "
                "allowed: scale_min < scale_max"
            )
        check_range(p + "max_tokens", self.max_tokens, 1, 1_000_000)
        check_range(p + "temperature", self.temperature, 0.0, 2.0)
        check_range(p + "concurrency", self.concurrency, 1, 1024)
        check_range(p + "image_size", self.image_size, 0, 16384)
        if self.api_key_env and not _ENV_NAME.fullmatch(self.api_key_env):
            raise DDRLError(
                f"{p}api_key_env={self.api_key_env!r}; allowed: the NAME of an environment "
                'variable (letters, digits, _), or "" for no key'
            )


@dataclass
class RewardConfig:
    """The training (proxy) reward."""

    name: str = field(
        default="ink",
        metadata={
            "help": 'built-in name (see `ddrl.rewards.REWARDS`) or "module:attr" factory; '
            'several as "a,b" (see weights and aggregate)'
        },
    )
    weights: str = field(
        default="", metadata={"help": 'one weight per reward in name, "1,0.5"; "" = all 1'}
    )
    aggregate: Literal["flow_grpo", "cosmos_rl"] = field(
        default="flow_grpo",
        metadata={
            "help": 'several rewards → advantages: "flow_grpo" = normalise the weighted sum in '
            'its group; "cosmos_rl" = normalise each, then their weighted mean (release)'
        },
    )
    clip: float = field(
        default=0.0,
        metadata={
            "help": "raw rewards clamped to [-clip, clip] before reward.scale and normalising "
            "(the DDRL release: +-5 on its remote rewards); 0 = no clamp"
        },
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "multiplies the reward (advantages are normalised, so mostly for logs)"},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of a reward model trained on first use (fixed, not the run's seed)"
        },
    )
    model: str = field(
        default="",
        metadata={"help": 'weights of a learned reward: hub id or local folder; "" = its default'},
    )
    batch: int = field(default=16, metadata={"help": "images per reward-model call"})
    device: Literal["auto", "cpu", "cuda"] = field(
        default="auto",
        metadata={"help": "where a reward model runs: auto = the run's device"},
    )
    frames: str = field(
        default="mean",
        metadata={"help": 'video → image reward: "mean" over frames, or frame indices "0,-1"'},
    )
    url: str = field(
        default="",
        metadata={
            "help": "http://host:port of a `ddrl reward-server` (used when reward.name = remote)"
        },
    )
    timeout: float = field(
        default=60.0,
        metadata={"help": "seconds the client waits on the server (connect, send, answer)"},
    )
    retries: int = field(
        default=3,
        metadata={"help": "extra attempts after a connection failure, timeout or HTTP 502/503/504"},
    )
    backoff: float = field(
        default=0.5,
        metadata={"help": "seconds before the first retry, doubled before each further one"},
    )
    overlap: bool = field(
        default=False,
        metadata={
            "help": "decode and score each rollout chunk (sampler.batch) in a worker thread while "
            "the next chunk samples: hides CPU-side or remote rewards; the same rewards"
        },
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def check(self) -> None:
        check_literals(self, "reward.")
        check_range("reward.scale", self.scale, -1e12, 1e12)
        check_range("reward.clip", self.clip, 0.0)
        check_range("reward.seed", self.seed, 0, 2**32 - 1)
        check_range("reward.batch", self.batch, 1)
        check_range("reward.timeout", self.timeout, 1e-3, 86400.0)
        check_range("reward.retries", self.retries, 0, 100)
        check_range("reward.backoff", self.backoff, 0.0, 3600.0)
        parse_weights(self.weights, len(parse_names(self.name)))
        self.judge.check()
        if self.url:
            check_url(self.url)
        if self.frames != "mean":
            try:
                [int(i) for i in self.frames.split(",")]
            except ValueError:
                raise DDRLError(
                    f"reward.frames={self.frames!r}; allowed: mean, or frame indices like 0,-1"
                ) from None


@dataclass
class GoldConfig:
    """The held-out judge used only by evaluation (never by the training loop)."""

    name: str = field(
        default="digits", metadata={"help": 'digits | toy2d | "" (none: gold metrics are left out)'}
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of the gold model (fixed across runs so evaluations compare)"},
    )

    def check(self) -> None:
        check_range("gold.seed", self.seed, 0, 2**32 - 1)
