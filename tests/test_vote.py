"""`ddrl vote`: the votes folder of two tiny digits runs (the samples are `ddrl sample`'s, reused
when asked again, refused when they would not match), the page's JSON API end to end on a real
server (votes resolved server-side, the rater policy, a restart that goes on where it stopped),
blindness (nothing the browser receives names a run), the balance of the pair plan, and the
summary's statistics against numbers worked out by hand."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from itertools import combinations

import pytest
from conftest import one_line, one_line_error, run_quick
from vote_folders import hand_folder

from ddrl.cli import main
from ddrl.errors import DDRLError
from ddrl.vote import prepare
from ddrl.vote.folder import MEDIA, VOTES, Manifest, Settings
from ddrl.vote.media import file_prompts
from ddrl.vote.plan import balanced_plan, plan_size
from ddrl.vote.prepare import prepare_votes
from ddrl.vote.server import VoteServer
from ddrl.vote.stats import bradley_terry, cohen_kappa, wilson
from ddrl.vote.store import VoteStore, read_votes
from ddrl.vote.summary import summarise, summary_text

BETA = "0.0173"  # a config value of one run that must never reach the browser


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-iteration digits runs (evaluated, for `ddrl report`): GRPO, and DDRL with a
    distinctive data_beta."""
    root = tmp_path_factory.mktemp("vote_runs")
    common = ("train.iterations=1", "eval.every=1", "eval.loss_t_points=1")
    a = run_quick(root, "alpha-run", *common, "algorithm=grpo")[1]
    b = run_quick(root, "beta-run", *common, f"loss.data_beta={BETA}")[1]
    return a, b


@pytest.fixture(scope="module")
def rendered(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("vote_rendered") / "votes"
    prepare_votes(list(runs), out, log=quiet)
    return out


@pytest.fixture
def votes(rendered, tmp_path):
    """A fresh copy of the rendered folder (its votes are the test's own)."""
    return shutil.copytree(rendered, tmp_path / "votes")


class Client:
    """GET / POST against a served page; every answer is kept (``seen``) for the blindness
    check."""

    def __init__(self, url: str):
        self.url, self.seen = url, []

    def _send(self, req) -> tuple[int, dict, bytes]:
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            out = e.code, dict(e.headers), e.read()
        self.seen.append(out)
        return out

    def get(self, path: str) -> tuple[int, dict, bytes]:
        return self._send(self.url + path)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"content-type": "application/json"}
        )
        status, _, data = self._send(req)
        return status, json.loads(data)

    def next(self, rater: str) -> dict:
        status, _, data = self.get(f"/api/next?rater={rater}")
        assert status == 200, data
        return json.loads(data)


def _label(m: Manifest, media_id: str) -> str:
    return m.runs[m.media[media_id]["run"]]["label"]


def test_the_api_end_to_end_with_a_restart(votes):
    m = Manifest.load(votes)
    q0, q1, q2 = (q["id"] for q in m.questions[:3])
    assert len(m.questions) == 20  # 1 run pair × 10 prompts × 2 samples
    with VoteServer(m, port=0) as server:
        c = Client(server.url)
        status, _, page = c.get("/")
        assert status == 200 and b'src="/vote.js"' in page
        assert c.get("/vote.js")[0] == 200
        ann = c.next("ann")
        assert ann["question"] == q0 and ann["criteria"] == ["overall"]
        assert ann["progress"] == {"done": 0, "total": 20, "answers": 0, "wanted": 40}
        assert ann["prompt"] == m.settings.prompts[m.questions[0]["prompt"]]
        assert c.next("bob")["question"] == q0  # two raters per question: bob overlaps ann
        assert c.next("cy")["question"] == q1  # q0 is held by two raters already
        assert c.get(ann["left"])[0] == 200 and c.get(ann["right"])[0] == 200
        vote = {"question": q0, "rater": "ann", "choices": {"overall": "left"}, "ms": 2100}
        status, answer = c.post("/api/vote", vote)
        assert status == 200 and answer["progress"]["done"] == 1
        assert c.post("/api/vote", vote)[0] == 409  # answered already
        assert c.post("/api/vote", {**vote, "question": q1, "choices": {"overall": "up"}})[0] == 400
        assert c.post("/api/vote", {**vote, "question": "0" * 16})[0] == 404
        assert c.post("/api/vote", {**vote, "question": q1, "ms": -1})[0] == 400
        assert c.get("/api/next?rater=")[0] == 400
        assert c.get("/nothing")[0] == 404 and c.get("/media/x.png")[0] == 404
        assert (
            c.post("/api/vote", {"question": q1, "rater": "ann", "skip": True, "ms": 50})[0] == 200
        )
        assert c.next("ann")["question"] == q2
        with pytest.raises(DDRLError, match="another ddrl vote serve"):
            VoteServer(m, port=0)
    rows = read_votes(votes / VOTES)
    assert [(r["rater"], r["question"], r.get("skip", False)) for r in rows] == [
        ("ann", q0, False),
        ("ann", q1, True),
    ]
    left, right = _label(m, m.questions[0]["left"]), _label(m, m.questions[0]["right"])
    assert rows[0]["pair"] == ["alpha-run", "beta-run"] and {left, right} == set(rows[0]["pair"])
    assert (rows[0]["left"], rows[0]["right"]) == (left, right)
    assert rows[0]["choices"] == {"overall": "left"} and rows[0]["winners"] == {"overall": left}
    assert rows[0]["ms"] == 2100 and "winners" not in rows[1]
    # A new server on the same folder goes on: ann is not asked q0 or q1 again.
    with VoteServer(Manifest.load(votes), port=0) as server:
        c = Client(server.url)
        again = c.next("ann")
        assert again["question"] == q2 and again["progress"]["done"] == 2
        assert again["progress"]["answers"] == 1
        assert c.next("bob")["question"] == q0  # one answer so far: a place is left


def test_nothing_the_browser_receives_names_a_run(votes, runs):
    m = Manifest.load(votes)
    with VoteServer(m, port=0) as server:
        c = Client(server.url)
        c.get("/")
        c.get("/vote.js")
        media = set()
        while not (q := c.next("eve")).get("done"):
            for side in ("left", "right"):
                assert re.fullmatch(r"/media/[0-9a-f]{16}\.png", q[side]), q[side]
                status, headers, _ = c.get(q[side])
                assert status == 200 and headers["content-type"] == "image/png"
                assert not {"last-modified", "etag"} & {h.lower() for h in headers}
                media.add(q[side])
            choice = ("left", "right", "tie")[len(media) % 3]
            answer = {"question": q["question"], "rater": "eve", "ms": 1}
            c.post("/api/vote", {**answer, "choices": {"overall": choice}})
    assert len(media) == 40  # every sample of both runs was shown
    forbidden = ["alpha-run", "beta-run", "grpo", "ddrl", BETA, "/final", runs[0].parent.name]
    forbidden += [str(r) for r in runs] + [r["stamp"] for r in m.runs]
    for _, headers, body in c.seen:
        received = (body + json.dumps(headers).encode()).lower()
        for word in forbidden:
            assert word.lower().encode() not in received, (word, body[:200])
    assert len(c.seen) > 80


@pytest.mark.parametrize("runs_, prompts, samples", [(2, 10, 2), (3, 4, 1), (4, 6, 3), (5, 1, 2)])
def test_the_pair_plan_is_balanced_at_every_length(runs_, prompts, samples):
    full = balanced_plan(runs_, prompts, samples, seed=3)
    assert len({(q.pair, q.prompt, q.sample) for q in full}) == plan_size(runs_, prompts, samples)
    assert full == balanced_plan(runs_, prompts, samples, seed=3)
    assert full != balanced_plan(runs_, prompts, samples, seed=4)
    pairs = list(combinations(range(runs_), 2))
    for n in range(1, len(full) + 1):
        plan = balanced_plan(runs_, prompts, samples, seed=3, limit=n)
        assert plan == full[:n]
        per_pair, per_prompt = Counter(q.pair for q in plan), Counter(q.prompt for q in plan)
        assert max(per_pair[p] for p in pairs) - min(per_pair[p] for p in pairs) <= 1
        assert (
            max(per_prompt[p] for p in range(prompts)) - min(per_prompt[p] for p in range(prompts))
            <= 1
        )
    sides = Counter(q.left for q in full)
    assert len(sides) == runs_  # every run is shown on the left somewhere
    one_line_error(balanced_plan, runs_, prompts, samples, 0, len(full) + 1, match="--pairs")


def test_the_media_are_ddrl_samples_and_a_folder_is_reused_or_refused(
    votes, runs, tmp_path, monkeypatch
):
    m = Manifest.load(votes)
    prompts = m.settings.prompts
    assert prompts == [str(d) for d in range(10)]  # the digits' evaluation prompts
    args = ["sample", str(runs[1]), "--out", str(tmp_path / "s"), "--n", "2", "--seed", "0"]
    assert main([*args, *(a for p in prompts for a in ("--prompt", p))]) == 0
    for x in m.media.values():
        if x["run"] == 1:
            made = tmp_path / "s" / f"p{x['prompt']}_s{x['sample']}.png"
            assert (votes / MEDIA / x["file"]).read_bytes() == made.read_bytes()
    monkeypatch.setattr(prepare, "render_run", lambda *a: pytest.fail("rendered again"))
    assert prepare_votes(list(runs), votes, log=quiet).questions == m.questions
    assert prepare_votes([], votes, Settings(raters_per_question=3), log=quiet).questions == (
        m.questions
    )
    assert Manifest.load(votes).settings.raters_per_question == 3
    refusals = [
        (list(runs[::-1]), Settings(), "the same runs"),
        ([], Settings(n_per_prompt=3), "n_per_prompt=2"),
        ([], Settings(prompts=["1"]), "prompts="),
    ]
    for given_runs, given, says in refusals:
        one_line_error(prepare_votes, given_runs, votes, given, log=quiet, match=says)
    replanned = prepare_votes([], votes, Settings(criteria=["overall", "sharpness"]), log=quiet)
    assert replanned.settings.criteria == ["overall", "sharpness"]  # no votes yet: a new plan
    (votes / VOTES).write_text('{"rater": "a", "question": "q", "skip": true}\n')
    one_line_error(prepare_votes, [], votes, Settings(pairs=5), log=quiet, match="has votes")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    one_line_error(prepare_votes, list(runs), tmp_path / "full", log=quiet, match="not a votes")


def test_summary_rates_wilson_and_bradley_terry_by_hand(tmp_path):
    m = hand_folder(tmp_path / "v", ["A", "B"], [f"p{i}" for i in range(6)], n=2)
    store = VoteStore(m)
    # r1 answers all 12 questions: A wins 7, 2 ties, B wins 3.
    for i, q in enumerate(m.questions):
        winner = "A" if i < 7 else "tie" if i < 9 else "B"
        side = next((s for s in ("left", "right") if _label(m, q[s]) == winner), "tie")
        store.record("r1", q["id"], {"overall": side}, 4000)
    store.close()
    s = summarise(m.root)
    (pair,) = s["pairs"]
    assert (pair["n"], pair["a_wins"], pair["ties"], pair["b_wins"]) == (12, 7, 2, 3)
    # Wilson, z = 1.959964, z² = 3.841459, n = 12: z²/n = 0.320122.
    # 7/12 = 0.583333: centre (0.583333 + 0.160061) / 1.320122 = 0.563125;
    #   half 1.959964 · sqrt(0.583333 · 0.416667 / 12 + 3.841459 / 576) / 1.320122
    #   = 1.959964 · sqrt(0.020255 + 0.006669) / 1.320122 = 0.243617 → [0.319508, 0.806742].
    # 2/12: centre 0.247498, half 0.200532 → [0.046966, 0.448030].
    # 3/12: centre 0.310624, half 0.221681 → [0.088943, 0.532305].
    # Without ties, 7/10: z²/n = 0.384146, centre 0.644493, half 0.247716 → [0.396777, 0.892209].
    expect = {
        "a_win_rate": (7 / 12, 0.319508, 0.806742),
        "tie_rate": (2 / 12, 0.046966, 0.448030),
        "b_win_rate": (3 / 12, 0.088943, 0.532305),
        "a_win_rate_excl_ties": (0.7, 0.396777, 0.892209),
    }
    for key, want in expect.items():
        assert pair[key] == pytest.approx(want, abs=1e-5), key  # hand rounding: 6 digits
    # Bradley–Terry, ties as half wins: W_A = 7 + 1 = 8, W_B = 3 + 1 = 4; with two runs the MLE
    # is p_A / p_B = W_A / W_B = 2, so with geometric mean 1: p_A = √2, p_B = 1/√2, and on the
    # Elo scale 1000 ± 400 · log10(√2) = 1000 ± 60.206.
    bt = s["bradley_terry"]["overall"]
    assert bt["strength"]["A"] == pytest.approx(math.sqrt(2), rel=1e-8)
    assert bt["strength"]["B"] == pytest.approx(1 / math.sqrt(2), rel=1e-8)
    assert bt["elo"]["A"] == pytest.approx(1060.206, abs=1e-3)
    assert "A win rate" in summary_text(s) and "0.58 [0.32, 0.81]" in summary_text(s)


def test_bradley_terry_three_runs_and_its_limits():
    # A–B 2:1, B–C 2:1, A–C 4:1 are consistent with strengths 4 : 2 : 1 (2/(2+1), 4/(4+1)), and
    # those satisfy the likelihood equations W_i = Σ_j n_ij p_i / (p_i + p_j) exactly:
    # W_A = 6 = 3 · 4/6 + 5 · 4/5; W_B = 3 = 3 · 2/6 + 3 · 2/3. Geometric mean 1: (2, 1, 0.5).
    wins = [[0, 2, 4], [1, 0, 2], [1, 1, 0]]  # wins[i][j]: i beat j
    assert bradley_terry(wins) == pytest.approx([2.0, 1.0, 0.5], rel=1e-8)
    assert bradley_terry([[0, 1, 0], [0, 0, 1], [1, 0, 0]]) == pytest.approx([1, 1, 1])
    assert bradley_terry([[0, 3], [0, 0]]) is None  # B never won: no finite MLE
    assert wilson(0, 0) == (0.0, 1.0)


def test_agreement_kappa_and_rater_flags_by_hand(tmp_path):
    # x: L L R T, y: L R R T on the same 4 questions: p_o = 3/4; shares x (L .5, R .25, T .25),
    # y (L .25, R .5, T .25): p_e = .5·.25 + .25·.5 + .25·.25 = 0.3125;
    # kappa = (0.75 − 0.3125) / (1 − 0.3125) = 0.4375 / 0.6875 = 7/11.
    assert cohen_kappa(list("LLRT"), list("LRRT")) == pytest.approx((0.75, 7 / 11))
    assert cohen_kappa(list("LL"), list("LL")) == (1.0, None)
    m = hand_folder(tmp_path / "k", ["A", "B"], [f"p{i}" for i in range(4)], raters=5)
    store = VoteStore(m)
    word = {"L": "left", "R": "right", "T": "tie"}
    for q, x, y in zip(m.questions, "LLRT", "LRRT", strict=True):
        store.record("x", q["id"], {"overall": word[x]}, 3000)
        store.record("y", q["id"], {"overall": word[y]}, 3000)
    store.close()
    agree = summarise(m.root)["agreement"]["overall"]
    assert agree["pairs"] == [
        {"raters": ["x", "y"], "n": 4, "agreement": 0.75, "kappa": pytest.approx(7 / 11)}
    ]
    assert (agree["n"], agree["agreement"], agree["kappa"]) == (4, 0.75, pytest.approx(7 / 11))

    m = hand_folder(tmp_path / "f", ["A", "B"], [f"p{i}" for i in range(11)], raters=9)
    store = VoteStore(m)
    plan = {  # rater → (choices over the 10 questions, ms each)
        "quick": (["left", "right", "tie"], [500, 800, 1200]),  # median 800 < 1500
        "lefty": (["left"] * 10, [3000] * 10),  # 10 of 10 the same: > 90%
        "nine": (["left"] * 9, [3000] * 9),  # fewer than 10 votes: not judged
        "ok": (["left"] * 9 + ["right"], [3000] * 10),  # 9 of 10 = 90%: not over
    }
    for rater, (choices, times) in plan.items():
        for q, choice, ms in zip(m.questions, choices, times, strict=False):
            store.record(rater, q["id"], {"overall": choice}, ms)
    store.record("ok", m.questions[10]["id"], None, 10)  # a skip: not a vote
    store.close()
    flags = {r["rater"]: r["flags"] for r in summarise(m.root)["raters"]}
    assert flags == {
        "quick": ["fast (median 800 ms < 1500)"],
        "lefty": ["same answer (left in 10 of 10)"],
        "nine": [],
        "ok": [],
    }
    assert {r["rater"]: r["flags"] for r in summarise(m.root, min_ms=700)["raters"]}["quick"] == []


def test_prompt_files_give_each_prompt_once_in_order(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n# a comment\na dog\na cat\n\na tree\n")
    assert file_prompts(tmp_path / "p.txt") == ["a cat", "a dog", "a tree"]


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "votes.jsonl"
    path.write_text('{"rater": "a"}\n{"rater": "b", "que')
    assert read_votes(path) == [{"rater": "a"}]
    assert path.read_text() == '{"rater": "a"}\n'
    path.write_text('{"rater": "a"}\n{"rat\n{"rater": "c"}\n')
    one_line_error(read_votes, path, match="line 2")


def test_summary_command_and_report_section(votes, runs, tmp_path, capsys):
    m = Manifest.load(votes)
    store = VoteStore(m)
    for q, choice in zip(m.questions[:3], ("left", "right", "tie"), strict=True):
        store.record("ann", q["id"], {"overall": choice}, 2500)
    store.close()
    capsys.readouterr()
    assert main(["vote", "summary", str(votes)]) == 0
    text = capsys.readouterr().out
    assert "3 votes (0 skipped) on 20 questions by 1 raters" in text and "alpha-run" in text
    assert main(["vote", "summary", str(votes), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["votes"] == 3 and s["pairs"][0]["n"] == 3 and s["runs"] == ["alpha-run", "beta-run"]
    out = tmp_path / "report"
    assert main(["report", *map(str, runs), "--out", str(out), "--votes", str(votes)]) == 0
    page = (out / "report.html").read_text()
    assert "<h2>Blind human preference</h2>" in page and "A win rate [95%]" in page
    assert json.loads((out / "votes.json").read_text())["votes"] == 3


def test_serve_command_continues_a_folder_and_stops_on_ctrl_c(votes):
    """`ddrl vote serve --out VOTES` (no runs: the folder's own) prints where it listens and the
    SSH tunnel, serves, and exits cleanly on SIGINT."""
    cmd = [sys.executable, "-m", "ddrl", "vote", "serve", "--out", str(votes), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)", line).group(1)
        assert f"ssh -L {url.rsplit(':', 1)[1]}:localhost:" in line
        assert Client(url).next("ann")["progress"]["total"] == 20
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read()


@pytest.mark.parametrize(
    "args, says",
    [
        (["summary"], "one votes folder"),
        (["summary", "{votes}", "--seed", "1"], "--seed"),
        (["serve", "{a}", "{b}"], "needs --out"),
        (["serve", "{a}", "--out", "{tmp}/v"], "1 distinct run(s)"),
        (["serve", "{a}", "{b}", "--out", "{tmp}/v", "--pairs", "21"], "--pairs 21"),
        (["serve", "{a}", "{b}", "--out", "{tmp}/v", "--criteria", "a,,b"], "--criteria"),
        (["serve", "{a}", "{tmp}", "--out", "{tmp}/v"], "not a run folder"),
        (["serve", "{a}", "{b}", "--out", "{tmp}/v", "x=1"], "overrides"),
        (["summary", "{tmp}"], "not a votes folder"),
    ],
)
def test_bad_vote_input_is_one_line(args, says, runs, rendered, tmp_path, capsys):
    fill = {"a": runs[0], "b": runs[1], "votes": rendered, "tmp": tmp_path}
    capsys.readouterr()
    assert main(["vote", *(a.format(**fill) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in one_line(err[0]), err
    assert not (tmp_path / "v").exists()
