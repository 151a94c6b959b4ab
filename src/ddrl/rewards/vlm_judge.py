"""A vision-language model as the reward, over the OpenAI chat-completions API that vLLM and
SGLang serve (``reward.name = "vlm_judge"``, settings ``reward.judge.*``; docs/REWARDS.md).

Each image [3, H, W] in [-1, 1] is quantised to 8 bits (as the reward wire does), resized so its
longest side is ``judge.image_size`` (0: as is), PNG-encoded and sent in its own request,
``POST {reward.url}/chat/completions``, with ``judge.concurrency`` requests in flight::

    {"model": judge.model, "max_tokens": ..., "temperature": ...,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": <template with {prompt} replaced by the prompt>}]}]}

The answer's ``choices[0].message.content`` becomes the reward:

- templates that ask for a score (``"score"``, ours, or a user's text): every match of
  ``judge.pattern`` (group 1; default: any number that is not a denominator, so "7/10" gives 7)
  is read, the last one or the mean of all (``judge.matches``) is the judge's score s, and
  r = clamp((s - scale_min) / (scale_max - scale_min), 0, 1). No match: a one-line DDRLError
  quoting the answer, or NaN (``judge.unparsable = "nan"``; the loop skips that group).
- ``"ocr"``: the model is asked to transcribe the image (verl-omni's GRM OCR prompt) and r is
  flow_grpo's OCR reward of the transcription against the prompt's quoted text
  (``ddrl.rewards.ocr.ocr_score``; whitespace of every kind removed, as verl-omni does).

Transient failures (connection, timeout, HTTP 429/502/503/504) are retried with
``reward.retries`` / ``reward.backoff`` (``ddrl.rewards.transport``); any other error status or
a garbled answer is a one-line DDRLError naming the URL. Samples with a non-finite pixel score
NaN without a request. Videos are scored frame by frame by ``MultiReward`` (``reward.frames``:
the mean over all frames, or over chosen ones, one request per frame); called directly with a
video this reward refuses it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import Tensor

from ddrl.errors import DDRLError
from ddrl.models.base import to_pil
from ddrl.rewards.base import RewardContext
from ddrl.rewards.config import JudgeConfig, RewardConfig
from ddrl.rewards.ocr import ocr_score, target_text
from ddrl.rewards.remote.wire import MAX_ANSWER_BYTES
from ddrl.rewards.transport import Retry, error_message, exchange, retried

TEMPLATES = {
    # ours (docs/DECISIONS.md "VLM judge")
    "score": (
        "This image was generated from the prompt:\n{prompt}\n\n"
        "Rate how well the image matches the prompt (objects, counts, attributes, relations and "
        "any text it asks for) together with its visual quality (clarity, no distortions or "
        "artifacts), from 0 (unrelated or broken) to 10 (faithful and flawless). "
        "Answer with the number only."
    ),
    # verl-omni's GRM OCR prompt (verl_omni/utils/reward_score/genrm_ocr.py:34-36)
    "ocr": (
        "Please output only the text content from the image without any additional "
        "descriptions or formatting."
    ),
}
# a number not preceded by a digit, a point or a slash: "Score: 7/10." → 7, "7.5" → 7.5
DEFAULT_PATTERN = r"(?<![\d./])(?<!/\s)(\d+(?:\.\d+)?)"
RETRY_STATUS = (429, 502, 503, 504)  # rate-limited, a proxy or an overloaded server


def pil_images(images: Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] → B RGB PIL images, quantised to 8 bits as the reward wire
    does (``ddrl.models.base.to_pil``)."""
    return [to_pil(x) for x in images]


def png_data_url(image: Image.Image, size: int = 0) -> str:
    """``data:image/png;base64,...`` of ``image``, its longest side scaled to ``size`` pixels
    first (Lanczos; the aspect ratio kept; 0 = as is)."""
    if size and max(image.size) != size:
        s = size / max(image.size)
        image = image.resize(
            (max(1, round(image.width * s)), max(1, round(image.height * s))),
            Image.Resampling.LANCZOS,
        )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_score(answer: str, pattern: re.Pattern, matches: str) -> float | None:
    """The judge's score in ``answer``: group 1 of the last match of ``pattern``, or the mean
    over all matches (``matches = "mean"``); None when nothing matches or a group is no number."""
    try:
        found = [float(m.group(1)) for m in pattern.finditer(answer)]
    except (TypeError, ValueError):  # an optional group that did not take part, or not a number
        return None
    if not found:
        return None
    return found[-1] if matches == "last" else sum(found) / len(found)


class VLMJudge:
    """r(x, c) from a VLM's answer about image x and prompt c (see the module docstring):
    images [B, 3, H, W] in [-1, 1] and B prompts → float32 [B] on the CPU."""

    def __init__(
        self,
        url: str,
        judge: JudgeConfig,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        if not url:
            raise DDRLError(
                "reward.url is empty; vlm_judge needs the API base of an OpenAI-compatible "
                "server (vLLM, SGLang), e.g. reward.url=http://HOST:8000/v1"
            )
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise DDRLError(f"reward.retries={retries!r}; allowed: an integer in [0, 100]")
        RewardConfig(
            "vlm_judge", url=url, timeout=timeout, retries=retries, backoff=backoff, judge=judge
        ).check()
        if not judge.model:
            raise DDRLError(
                "reward.judge.model is empty; vlm_judge needs the served model name (vLLM's "
                "--served-model-name, else the model path it serves; GET /v1/models lists it)"
            )
        self.key = ""
        if judge.api_key_env:
            self.key = os.environ.get(judge.api_key_env, "")
            if not self.key:
                raise DDRLError(
                    f"reward.judge.api_key_env={judge.api_key_env!r}, but that environment "
                    "variable is not set or empty; allowed: set it, or api_key_env=''"
                )
        self.base = url.rstrip("/")
        self.endpoint = self.base + "/chat/completions"
        self.judge = judge
        self.ocr = judge.template == "ocr"
        self.text = TEMPLATES.get(judge.template, judge.template)
        self.pattern = re.compile(judge.pattern or DEFAULT_PATTERN)
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self._warned = False

    def __repr__(self) -> str:
        return f"VLMJudge({self.endpoint!r}, model={self.judge.model!r})"

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DDRLError(
                f"vlm_judge: images of shape {tuple(getattr(images, 'shape', ()))}; allowed: "
                "[B, 3, H, W] (videos are scored frame by frame through reward.frames)"
            )
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise DDRLError(f"vlm_judge: {len(prompts)} prompts for {images.shape[0]} images")
        targets = [target_text(p) for p in prompts] if self.ocr else prompts  # before requests
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        out = torch.full((images.shape[0],), float("nan"))
        todo = images.detach().flatten(1).isfinite().all(1).cpu().nonzero().flatten().tolist()
        if not todo:
            return out
        pics = pil_images(images)
        with ThreadPoolExecutor(min(self.judge.concurrency, len(todo))) as pool:
            futures = [(i, pool.submit(self._judge, pics[i], prompts[i], targets[i])) for i in todo]
            try:
                for i, f in futures:
                    out[i] = f.result()
            except BaseException:
                for _, f in futures:  # the requests not started yet are not sent
                    f.cancel()
                raise
        return out

    def health(self) -> None:
        """One GET {url}/models before training: the server answers and serves
        ``judge.model`` (a server without that list, HTTP 404, passes)."""
        req = urllib.request.Request(self.base + "/models", headers=self._headers(), method="GET")
        try:
            raw = exchange(req, self.timeout, (), MAX_ANSWER_BYTES)
        except Retry as e:
            raise DDRLError(f"VLM judge {self.base} is not reachable: {e}") from None
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return
            raise self._refused(e, "/models") from None
        try:
            served = [m["id"] for m in json.loads(raw)["data"]]
        except (ValueError, KeyError, TypeError):
            raise DDRLError(
                f"VLM judge {self.base}/models gave a bad answer (starts {raw[:40]!r}); "
                "expected the OpenAI model list"
            ) from None
        if self.judge.model not in served:
            raise DDRLError(
                f"reward.judge.model={self.judge.model!r} is not served at {self.base}; "
                f"served: {', '.join(map(str, served)) or 'none'}"
            )

    # one image ---------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def _judge(self, image: Image.Image, prompt: str, target: str) -> float:
        text = self.text if self.ocr else self.text.replace("{prompt}", prompt)
        body = {
            "model": self.judge.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": png_data_url(image, self.judge.image_size)},
                        },
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "max_tokens": self.judge.max_tokens,
            "temperature": self.judge.temperature,
        }
        data = json.dumps(body).encode()
        answer, finish = retried(
            lambda: self._post(data), f"VLM judge {self.endpoint}", self.retries, self.backoff
        )
        if self.ocr:  # the transcription against the quoted text, all whitespace removed
            return ocr_score("".join(answer.split()), target)
        s = read_score(answer, self.pattern, self.judge.matches)
        if s is None:
            return self._unparsable(answer, finish)
        lo, hi = self.judge.scale_min, self.judge.scale_max
        return min(max((s - lo) / (hi - lo), 0.0), 1.0)

    def _post(self, data: bytes) -> tuple[str, str]:
        """(answer text, finish_reason) of one chat request; Retry for a transient failure."""
        req = urllib.request.Request(
            self.endpoint, data=data, method="POST", headers=self._headers()
        )
        try:
            raw = exchange(req, self.timeout, RETRY_STATUS, MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as e:
            raise self._refused(e, "/chat/completions") from None
        if len(raw) > MAX_ANSWER_BYTES:
            raise self._bad(f"more than {MAX_ANSWER_BYTES} bytes")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._bad(f"not JSON (starts {raw[:40]!r})") from None
        try:
            choice = obj["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise self._bad(f"no choices[0].message.content (got {keys})") from None
        if content is not None and not isinstance(content, str):
            raise self._bad(f"message.content is a {type(content).__name__}, not text")
        return content or "", str(choice.get("finish_reason") or "")

    def _refused(self, e: urllib.error.HTTPError, path: str) -> DDRLError:
        hint = {
            401: "; is the key right (reward.judge.api_key_env)?",
            403: "; is the key right (reward.judge.api_key_env)?",
            404: "; is reward.url the API base, ending in /v1, and reward.judge.model served?",
        }.get(e.code, "")
        return DDRLError(
            f"VLM judge {self.base}{path} refused the request (HTTP {e.code}): "
            f"{error_message(e, MAX_ANSWER_BYTES)}{hint}"
        )

    def _bad(self, what: str) -> DDRLError:
        return DDRLError(f"VLM judge {self.endpoint} gave a bad answer: {what}")

    def _unparsable(self, answer: str, finish: str) -> float:
        cut = (
            f" (cut at reward.judge.max_tokens={self.judge.max_tokens})"
            if finish == "length"
            else ""
        )
        msg = (
            f"VLM judge {self.endpoint}: answer {answer[:80]!r}{cut} has no match of "
            f"{self.pattern.pattern!r} (reward.judge.pattern)"
        )
        if self.judge.unparsable == "error":
            raise DDRLError(
                f"{msg}; allowed: a pattern that matches the judge's score, or "
                "reward.judge.unparsable=nan to skip such samples"
            )
        if not self._warned:
            warnings.warn(f"{msg}; scored NaN (reward.judge.unparsable=nan)", stacklevel=2)
            self._warned = True
        return float("nan")


def judge_factory(ctx: RewardContext) -> VLMJudge:
    """reward.name = "vlm_judge": the judge at reward.url with the reward.judge.* settings."""
    c = ctx.config
    return VLMJudge(c.url, c.judge, c.timeout, c.retries, c.backoff)
