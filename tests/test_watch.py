"""The watch: rule grammar, signals re-derived by hand, streaks and actions, and the loop's
stop / keep_best with their resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import one_line_error, run_quick
from helpers_quick import quick

from ddrl.cli import main
from ddrl.config import build_config
from ddrl.dist.checkpoint import load_checkpoint
from ddrl.errors import WatchStopped
from ddrl.models import load_generator
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl
from ddrl.watch import DEFAULT_RULES, Watch, WatchConfig, parse_rule, signals

QUIET = {"log": lambda *a, **k: None}


def test_rules_parse_and_bad_ones_are_one_line_errors():
    r = parse_rule(" heldout_loss_rise > 0.1 : stop : 2 ")
    assert (r.signal, r.op, r.threshold, r.action, r.patience) == (
        "heldout_loss_rise",
        ">",
        0.1,
        "stop",
        2,
    )
    assert parse_rule("gold_accuracy<0.8:warn").holds(0.79)
    assert not parse_rule("gold_accuracy<0.8:warn").holds(0.8)
    for bad, needle in [
        ("heldout_loss_rise=0.1:warn", "SIGNAL>THRESHOLD"),
        ("heldout_loss_rise>abc:warn", "threshold 'abc'"),
        ("heldout_loss_rise>0.1:explode", "unknown action 'explode'"),
        ("heldout_loss_rise>0.1:warn:0", "patience '0'"),
    ]:
        one_line_error(parse_rule, bad, match=needle)
    msg = one_line_error(
        build_config, overrides=['watch.rules=["heldout_los_rise>0.1:stop"]'], match="unknown"
    )
    assert "heldout_los_rise" in msg and "heldout_loss_rise" in msg
    one_line_error(build_config, overrides=["watch.best_metric=reward"], match="best_metric")
    # the command-line forms: a JSON list, a comma list, [] for none
    assert build_config(overrides=["watch.rules=[]"]).watch.rules == []
    two = build_config(overrides=["watch.rules=fd_rise>2:stop,diversity_drop>0.3:warn:2"])
    assert two.watch.rules == ["fd_rise>2:stop", "diversity_drop>0.3:warn:2"]
    assert build_config().watch.rules == DEFAULT_RULES
    # the key the watch replaced sets the held-out rule's threshold
    old = build_config(overrides=["eval.loss_warn=0.25"]).watch.rules
    assert "heldout_loss_rise>0.25:warn" in old and "heldout_loss_rise>0.1:warn" not in old


def test_signals_by_hand():
    base = {
        "proxy_reward": 0.4,
        "gold_accuracy": 0.9,
        "heldout_diffusion_loss": 0.5,
        "fd": 2.0,
        "diversity": 4.0,
        "saturation_rate": 0.1,
        "out_of_range_rate": 0.01,
        "ood_clip": 0.25,
        "ood_pick": 20.0,
    }
    row = {
        "proxy_reward": 0.6,  # +50%
        "gold_accuracy": 0.72,  # -20%
        "heldout_diffusion_loss": 0.55,  # +10%
        "fd": 5.0,  # +150%
        "diversity": 3.0,  # -25%
        "saturation_rate": 0.25,  # +0.15 absolute
        "out_of_range_rate": 0.03,
        "ood_clip": 0.24,  # -4%
        "ood_pick": 18.0,  # -10%
    }
    s = signals(row, base)
    assert s["heldout_loss_rise"] == pytest.approx(0.1)
    assert s["gold_gap"] == pytest.approx(min(0.5, 0.2))
    assert s["fd_rise"] == pytest.approx(1.5)
    assert s["diversity_drop"] == pytest.approx(0.25)
    assert s["saturated_rate"] == pytest.approx((0.25 + 0.03) - (0.1 + 0.01))
    assert s["ood_clip_drop"] == pytest.approx(0.04) and s["ood_pick_drop"] == pytest.approx(0.1)
    assert s["ood_drop"] == pytest.approx(0.1)
    assert s["gold_accuracy"] == 0.72 and s["proxy_reward_rise"] == pytest.approx(0.5)
    # gold rose: no gap whatever the proxy did (min of the two is negative)
    assert signals({**row, "gold_accuracy": 0.95}, base)["gold_gap"] < 0
    # a run without a gold evaluator or held-out data measures neither signal
    bare = signals({"proxy_reward": 1.0, "diversity": 2.0}, {"proxy_reward": 1.0, "diversity": 2.0})
    assert "gold_gap" not in bare and "heldout_loss_rise" not in bare and "fd_rise" not in bare


def _rows(losses, proxies):
    return [
        {"iteration": i, "heldout_diffusion_loss": loss, "proxy_reward": p, "diversity": 1.0}
        for i, (loss, p) in enumerate(zip(losses, proxies, strict=True))
    ]


def test_patience_streaks_stop_and_keep_best():
    cfg = WatchConfig(
        rules=[
            "heldout_loss_rise>0.1:stop:2",
            "heldout_loss_rise>0.05:keep_best",
            "gold_gap>0:warn",
        ]
    )
    logs = []
    w = Watch(cfg, log=logs.append)
    # rises: 0, .08, .12, .04, .12, .14 ; proxies rise throughout
    rows = _rows([1.0, 1.08, 1.12, 1.04, 1.12, 1.14], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    verdicts = [w.observe(r["iteration"], r) for r in rows]
    # the stop rule needs two evaluations in a row: 4 and 5 (2 alone is broken by 3)
    assert [v.stop != "" for v in verdicts] == [False] * 5 + [True]
    assert "heldout_loss_rise 0.14 > 0.1 at 2 evaluations in a row" in verdicts[5].stop
    # keep_best: clean evaluations are 0 and 3 (rise ≤ 0.05); best proxy grows there
    assert [v.best for v in verdicts] == [True, False, False, True, False, False]
    # gold_gap cannot be measured without a gold evaluator: said once
    assert sum("gold_gap is not measured" in m for m in logs) == 1
    firings = [f for v in verdicts for f in v.firings]
    by_rule = {}  # once per streak: keep_best holds at 1-2 and 4-5
    for f in firings:
        by_rule.setdefault(f["rule"], []).append(f["iteration"])
    assert by_rule == {
        "heldout_loss_rise>0.05:keep_best": [1, 4],
        "heldout_loss_rise>0.1:stop:2": [5],
    }
    assert rows[2]["heldout_loss_rise"] == pytest.approx(0.12)  # written into the row
    # replaying the first k rows gives the same state: the rest acts identically
    for k in range(len(rows)):
        again = Watch(cfg, [dict(r) for r in rows[:k]], log=lambda m: None)
        rest = [again.observe(r["iteration"], dict(r)) for r in rows[k:]]
        assert [(v.stop, v.best, v.firings) for v in rest] == [
            (v.stop, v.best, v.firings) for v in verdicts[k:]
        ]


def test_a_stop_rule_ends_the_run_with_code_3_after_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--out",
        str(out),
        *quick("train.iterations=2", "eval.every=1", "train.checkpoint_every=10"),
        "watch.rules=diversity>0:stop",  # always holds: fires at the first evaluation after 0
    ]
    assert main(args) == 3
    err = capsys.readouterr().err
    line = next(m for m in err.splitlines() if "stopped by the watch" in m)
    assert "diversity" in line and "> 0" in line and "step-000001" in line
    assert [r["iteration"] for r in read_jsonl(out / "eval.jsonl")] == [0, 1]
    # the base (iteration 0) is what signals compare with: rules count from iteration 1
    fired = read_jsonl(out / "watch.jsonl")
    assert [(f["iteration"], f["action"], f["signal"]) for f in fired] == [(1, "stop", "diversity")]
    assert (out / "checkpoints" / "step-000001").is_dir() and not (out / "final").exists()
    # resumed with the rule removed, it trains on to the end from that checkpoint
    assert main(["train", "--out", str(out), "--resume", "watch.rules=[]"]) == 0
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert (out / "final").is_dir()


def test_keep_best_saves_the_best_clean_evaluation_and_resumes_to_the_same(tmp_path):
    ov = (
        "train.iterations=3",
        "eval.every=1",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
        # the quick base's proxy rises about 1, 3, 5% over these evaluations
        "watch.rules=proxy_reward_rise>0.04:keep_best",
    )
    cfg, full, _ = run_quick(tmp_path, "full", *ov)
    evals = read_jsonl(full / "eval.jsonl")
    clean = [r for r in evals if r["proxy_reward"] <= 1.04 * evals[0]["proxy_reward"]]
    want = max(clean, key=lambda r: r["proxy_reward"])
    record = json.loads((full / "best" / "best.json").read_text())
    assert record["iteration"] == want["iteration"] and record["value"] == want["proxy_reward"]
    assert len(clean) < len(evals), "the test needs an evaluation the rule excludes"
    # best/ holds the weights evaluated then: the checkpoint's at that iteration
    best = load_generator(full / "best")
    if want["iteration"]:
        _, ck = load_checkpoint(full / "checkpoints" / f"step-{want['iteration']:06d}")
        for k, p in best.denoiser.named_parameters():
            assert torch.equal(p.detach(), ck["model"][k]), k
    # killed after 1 iteration and resumed: the same best/ and the same firings
    half = prepare_run_dir(tmp_path / "half", resume=False, overwrite=False)
    cfg2 = build_config(overrides=quick(*ov, "train.iterations=1"))
    train(cfg2, half, **QUIET)
    cfg2.train.iterations = 3
    train(cfg2, half, resume=True, **QUIET)
    assert json.loads((half / "best" / "best.json").read_text()) == record
    assert read_jsonl(half / "watch.jsonl") == read_jsonl(full / "watch.jsonl")
    again = load_generator(half / "best")
    for (k, p), (_, q) in zip(
        best.denoiser.named_parameters(), again.denoiser.named_parameters(), strict=True
    ):
        assert torch.equal(p, q), k


def test_a_stop_rule_under_the_api_raises_and_keeps_the_checkpoint(tmp_path):
    cfg = build_config(
        overrides=quick("train.iterations=3", "eval.every=1", "watch.rules=diversity>0:stop:2")
    )
    out = prepare_run_dir(tmp_path / "r", resume=False, overwrite=False)
    with pytest.raises(WatchStopped) as e:
        train(cfg, out, **QUIET)
    assert "at 2 evaluations in a row" in e.value.reason
    assert str(e.value.checkpoint).endswith("step-000002")
    assert [r["iteration"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_the_report_marks_firings_and_measures_lead_time(tmp_path):
    from ddrl.experiments.hacking import watch_analysis, watch_summary
    from ddrl.experiments.report import write_report

    def arm(label, golds, fired):
        curve = [
            {"iteration": 5 * i, "proxy_reward": 0.3 + 0.01 * i, "gold_accuracy": g}
            for i, g in enumerate(golds)
        ]
        watch = [{"iteration": it, "rule": rule} for rule, it in fired]
        return {
            "algorithm": label,
            "label": label,
            "curve": curve,
            "final": curve[-1],
            "watch": watch,
        }

    base = {"proxy_reward": 0.3, "gold_accuracy": 1.0}
    metrics = {
        "base": base,
        "arms": [
            # gold below 0.9 (0.9 × base) first at iteration 15; fired at 5 and 10: lead 10
            arm("early", [1.0, 0.95, 0.92, 0.85], [("a>1:warn", 10), ("b>1:warn", 5)]),
            arm("late", [1.0, 0.85, 0.8, 0.7], [("a>1:warn", 15)]),  # gold at 5: lead −10
            arm("missed", [1.0, 0.95, 0.8, 0.8], []),
            arm("alarm", [1.0, 1.0, 0.99, 0.98], [("b>1:warn", 10)]),
            arm("quiet", [1.0, 1.0, 1.0, 1.0], []),
        ],
    }
    rows = {r["label"]: r for r in watch_analysis(metrics)}
    assert (rows["early"]["first_firing"], rows["early"]["lead"]) == (5, 10)
    assert rows["late"]["lead"] == -10 and rows["late"]["outcome"] == "caught"
    assert [rows[k]["outcome"] for k in ("missed", "alarm", "quiet")] == [
        "missed",
        "false alarm",
        "quiet",
    ]
    summary = watch_summary(list(rows.values()))
    assert "2 of the 3 arms that hacked (lead in iterations: -10, +10)" in summary
    assert "1 of the 2 that did not" in summary
    page = write_report(metrics, tmp_path).read_text()
    assert "The watch" in page and "a&gt;1:warn @ 10; b&gt;1:warn @ 5" in page
    assert (tmp_path / "reward_curves.png").stat().st_size > 0


def test_keep_best_is_refused_when_the_weights_are_sharded(monkeypatch):
    from ddrl.training import loop
    from ddrl.training.components import build_components

    cfg = build_config(overrides=quick("watch.rules=diversity>0:keep_best"))
    c = build_components(cfg, lambda *a, **k: None)

    class Sharded(loop.Parallel):  # the layout fsdp gives (which needs torchrun to build)
        def __init__(self, *args):
            super().__init__(*args)
            self.sharded = True

    monkeypatch.setattr(loop, "Parallel", Sharded)
    one_line_error(loop.prepare_learner, cfg, c, "cpu", print, match="keep_best")
