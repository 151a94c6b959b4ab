"""The votes of a folder (``votes.jsonl``) and which question each rater is asked next.

One row per answer, appended whole under a lock and synced before the answer is acknowledged:
``{"time", "rater", "question", "pair": [run, run], "left": run, "right": run, "prompt",
"sample", "choices": {criterion: "left" | "right" | "tie"}, "winners": {criterion: run |
"tie"}, "ms"}``, or ``"skip": true`` in place of choices and winners. Run identities are
resolved here, from the manifest, never sent to the page.

Policy: a rater gets the first question of the plan they have neither answered nor skipped and
that has fewer than ``raters_per_question`` answers, counting the questions other raters were
handed in the last ``LEASE_S`` seconds and have not answered yet (so two raters at once do not
both fill the last place). Raters thus walk the plan in the same order: the first raters of a
question overlap, which inter-rater agreement needs, and every question gets its share before
the plan is exhausted. A restarted server reads the file back and goes on where it stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections import Counter
from datetime import datetime, timezone

from ddrl.errors import DDRLError
from ddrl.vote.folder import VOTES, Manifest

CHOICES = ("left", "right", "tie")
LEASE_S = 600.0


def read_votes(path) -> list[dict]:
    """The rows of votes.jsonl; a last line cut short by a killed writer is dropped (and cut
    from the file, so the next row starts on a line of its own)."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n < len(lines) - 1:
                raise DDRLError(f"{path} line {n + 1} is not JSON; the file is damaged") from None
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(line))
    return rows


class VoteStore:
    """The votes of the folder of ``manifest``, held open by this process (a second server on
    the same folder is refused) until ``close()``."""

    def __init__(self, manifest: Manifest, lease_s: float = LEASE_S):
        self.m, self.path, self.lease_s = manifest, manifest.root / VOTES, lease_s
        self._hold = open(manifest.root / ".serving.lock", "w")  # noqa: SIM115 (held open)
        try:
            fcntl.flock(self._hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._hold.close()
            raise DDRLError(f"another ddrl vote serve is using {manifest.root}") from None
        self._lock = threading.Lock()
        self.questions = {q["id"]: q for q in manifest.questions}
        self.seen: dict[str, set[str]] = {}  # rater → questions answered or skipped
        self.answers: Counter[str] = Counter()  # question → answers (skips not counted)
        self._leases: dict[str, dict[str, float]] = {}  # question → rater → time handed out
        for row in read_votes(self.path):
            self._note(row)

    def close(self) -> None:
        self._hold.close()

    def _note(self, row: dict) -> None:
        self.seen.setdefault(row["rater"], set()).add(row["question"])
        if not row.get("skip"):
            self.answers[row["question"]] += 1

    def next_for(self, rater: str) -> dict | None:
        """The question ``rater`` is asked now (policy in the module docstring); None when
        there is none left for them."""
        with self._lock:
            now, seen = time.monotonic(), self.seen.get(rater, set())
            for q in self.m.questions:
                if q["id"] in seen:
                    continue
                held = self._leases.setdefault(q["id"], {})
                others = sum(r != rater and now - t < self.lease_s for r, t in held.items())
                if self.answers[q["id"]] + others < self.m.settings.raters_per_question:
                    held[rater] = now
                    return q
            return None

    def record(self, rater: str, qid: str, choices: dict[str, str] | None, ms: float) -> dict:
        """Append ``rater``'s answer to question ``qid`` (``choices`` per criterion; None = a
        skip) and return the row; DDRLError for an unknown question, a second answer by the
        same rater or choices that do not name each criterion once."""
        q = self.questions.get(qid)
        if q is None:
            raise DDRLError(f"unknown question {qid!r}")
        criteria = self.m.settings.criteria
        if choices is not None and (
            set(choices) != set(criteria) or any(c not in CHOICES for c in choices.values())
        ):
            raise DDRLError(
                f"choices {choices!r}; allowed: one of {', '.join(CHOICES)} for each of "
                f"{', '.join(criteria)}"
            )
        label = [r["label"] for r in self.m.runs]
        a, b = q["pair"]
        side = {s: label[self.m.media[q[s]]["run"]] for s in ("left", "right")}
        row = {
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "rater": rater,
            "question": qid,
            "pair": [label[a], label[b]],
            "left": side["left"],
            "right": side["right"],
            "prompt": self.m.settings.prompts[q["prompt"]],
            "sample": q["sample"],
            "ms": round(float(ms)),
        }
        if choices is None:
            row["skip"] = True
        else:
            row["choices"] = {c: choices[c] for c in criteria}
            row["winners"] = {c: side.get(v, "tie") for c, v in row["choices"].items()}
        with self._lock:
            if qid in self.seen.get(rater, set()):
                raise DDRLError(f"{rater!r} has already answered question {qid!r}")
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._note(row)
            self._leases.get(qid, {}).pop(rater, None)
        return row

    def progress(self, rater: str) -> dict:
        """``rater``'s questions done, the plan's size, and every rater's answers against the
        ``questions × raters_per_question`` the plan asks for."""
        with self._lock:
            return {
                "done": len(self.seen.get(rater, ())),
                "total": len(self.m.questions),
                "answers": sum(self.answers.values()),
                "wanted": len(self.m.questions) * self.m.settings.raters_per_question,
            }
