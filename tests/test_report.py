"""Report generation on a small synthetic metrics dict, and `ddrl report` on run folders."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import one_line_error

import ddrl.experiments.figures as figures_module
import ddrl.experiments.runs_report as runs_report
from ddrl.cli import main
from ddrl.config import build_config, save_config
from ddrl.evaluation.pictures import save_image_grid
from ddrl.experiments.hacking import arm_label, hacking_analysis
from ddrl.experiments.report import write_report
from ddrl.experiments.runs_report import report_runs

BASE = {
    "proxy_reward": 0.2,
    "gold_accuracy": 0.95,
    "diversity": 3.0,
    "heldout_diffusion_loss": 1.0,
    "fd": 0.0,
}


def _curve(rewards, golds, losses):
    return [
        {
            "iteration": i,
            "proxy_reward": r,
            "gold_accuracy": g,
            "diversity": 3.0 - 0.2 * i,
            "heldout_diffusion_loss": loss,
            "fd": 0.1 * i,
        }
        for i, (r, g, loss) in enumerate(zip(rewards, golds, losses, strict=True))
    ]


def _arm(algorithm, setting, curve, label=None):
    arm = {"algorithm": algorithm, "setting": setting, "curve": curve, "final": dict(curve[-1])}
    arm["final"].pop("iteration")
    arm["final"]["ink_mean"] = 0.123456
    if label:
        arm["label"] = label
    return arm


@pytest.fixture
def metrics():
    # Iterations 0..4. The hacker's loss crosses 1.1 at iteration 1 and its gold drops below 0.9
    # at iteration 3: 2 iterations of warning.
    hacker = _arm(
        "flow_grpo",
        {"beta_kl": 0.01},
        _curve(
            [0.3, 0.5, 0.7, 0.9, 0.95], [0.95, 0.94, 0.92, 0.85, 0.6], [1.0, 1.2, 1.4, 1.8, 2.5]
        ),
    )
    steady = _arm(
        "ddrl",
        {"data_beta": 0.3},
        _curve(
            [0.3, 0.4, 0.5, 0.55, 0.6], [0.96, 0.97, 0.97, 0.96, 0.97], [1.0, 1.0, 1.05, 1.02, 1.01]
        ),
    )
    # Gold drops at iteration 1 but the loss only rises at iteration 3: no early warning.
    late = _arm(
        "dance_grpo",
        {},
        _curve([0.3, 0.6, 0.8, 0.9, 0.9], [0.9, 0.8, 0.7, 0.6, 0.5], [1.0, 1.05, 1.08, 1.3, 1.6]),
    )
    return {"base": BASE, "reward": "ink", "arms": [hacker, steady, late]}


def test_arm_label():
    assert arm_label({"algorithm": "ddrl", "setting": {"data_beta": 0.3}}) == "ddrl(data_beta=0.3)"
    assert arm_label({"algorithm": "dance_grpo", "setting": {}}) == "dance_grpo"
    assert arm_label({"algorithm": "ddrl", "setting": {"a": 1}, "label": "mine"}) == "mine"


def test_hacking_analysis_values(metrics):
    hacker, steady, late = hacking_analysis(metrics)

    assert hacker["label"] == "flow_grpo(beta_kl=0.01)"
    assert hacker["first_loss_rise_iteration"] == 1
    assert hacker["first_gold_drop_iteration"] == 3
    assert hacker["hacked"] is True
    assert hacker["early_warning"] is True
    assert hacker["sentence"].startswith("flow_grpo(beta_kl=0.01) hacked the reward")
    assert "iteration 1 " in hacker["sentence"] and "iteration 3 " in hacker["sentence"]
    assert "2 iterations of warning" in hacker["sentence"]

    assert steady["label"] == "ddrl(data_beta=0.3)"
    assert steady["first_loss_rise_iteration"] is None
    assert steady["first_gold_drop_iteration"] is None
    assert steady["hacked"] is False
    assert steady["early_warning"] is None
    assert steady["sentence"] == (
        "ddrl(data_beta=0.3) did not hack: gold accuracy stayed \u2265 0.85 (final 0.97) "
        "and the held-out diffusion loss stayed within 10% of the base."
    )

    assert late["label"] == "dance_grpo"
    assert late["first_loss_rise_iteration"] == 3
    assert late["first_gold_drop_iteration"] == 1
    assert late["hacked"] is True
    assert late["early_warning"] is False
    assert "dance_grpo" in late["sentence"] and "no early warning" in late["sentence"]


def test_hacking_analysis_thresholds_and_final_only_drop(metrics):
    # A looser loss threshold (50%) moves the hacker's first rise to iteration 3.
    hacker = hacking_analysis(metrics, loss_rise=0.5)[0]
    assert hacker["first_loss_rise_iteration"] == 3
    assert hacker["early_warning"] is True
    assert "same iteration" in hacker["sentence"]
    # Hacked only by the final evaluation, with no curve point below the floor.
    m = copy.deepcopy(metrics)
    m["arms"][1]["final"]["gold_accuracy"] = 0.8
    steady = hacking_analysis(m)[1]
    assert steady["hacked"] is True and steady["first_gold_drop_iteration"] is None
    assert steady["early_warning"] is None
    assert "final gold accuracy 0.80" in steady["sentence"]


def test_write_report_single_regime(metrics, tmp_path):
    grid = save_image_grid(torch.rand(20, 1, 8, 8) * 2 - 1, tmp_path / "samples_base.png")
    path = write_report(
        metrics, tmp_path, grids={"base <samples>": grid}, title="T & t", notes="a < b"
    )
    assert path == tmp_path / "report.html"
    for name in ("reward_curves.png", "pareto.png", "heldout_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    page = path.read_text(encoding="utf-8")
    assert "T &amp; t" in page and "a &lt; b" in page and "base &lt;samples&gt;" in page
    assert "not measured" not in page  # every main metric is there
    assert 'src="samples_base.png"' in page and 'src="pareto.png"' in page
    for a in hacking_analysis(metrics):
        assert a["label"] in page
    assert "0.1235" in page  # an extra numeric key, 4 significant digits
    assert page.count("<tr>") == 1 + 1 + 3  # header, base, three arms


def test_write_report_multi_regime(metrics, tmp_path):
    other = copy.deepcopy(metrics)
    other["reward"] = "brightness"
    multi = {"regimes": {"ink": metrics, "brightness": other}}
    page = write_report(multi, tmp_path).read_text(encoding="utf-8")
    for reg in ("ink", "brightness"):
        for stem in ("reward_curves", "pareto", "heldout_loss"):
            assert (tmp_path / f"{stem}_{reg}.png").stat().st_size > 0
            assert f'src="{stem}_{reg}.png"' in page
        assert f"Regime: {reg}" in page
    assert not (tmp_path / "pareto.png").exists()


def test_save_image_grid_digits(tmp_path):
    out = save_image_grid(torch.randn(20, 1, 8, 8), tmp_path / "g" / "grid.png", title="digits")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = save_image_grid(torch.rand(3, 3, 16, 16), tmp_path / "rgb.png", nrow=2)
    assert rgb.stat().st_size > 0


def _without_gold(metrics):
    """The same metrics as a run without a gold evaluator writes them (no gold keys at all)."""
    m = copy.deepcopy(metrics)
    gold = ("gold_accuracy", "fd")
    m["base"] = {k: v for k, v in m["base"].items() if k not in gold}
    for arm in m["arms"]:
        arm["final"] = {k: v for k, v in arm["final"].items() if k not in gold}
        arm["curve"] = [{k: v for k, v in p.items() if k not in gold} for p in arm["curve"]]
    return m


def test_write_report_without_gold_metrics(metrics, tmp_path):
    m = _without_gold(metrics)
    page = write_report(m, tmp_path).read_text(encoding="utf-8")
    for name in ("reward_curves.png", "pareto.png", "heldout_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    # The gold columns stay, a dash in every row, and a line says no run has them.
    assert "<th>gold_<wbr>accuracy</th>" in page and "<th>proxy_<wbr>reward</th>" in page
    # gold_accuracy and fd in 4 rows, and the base's ink_mean (only the arms have it)
    assert page.count("<td>\u2014</td>") == 2 * (1 + 3) + 1
    assert "No run here has gold_accuracy, fd." in page
    assert page.count("<tr>") == 1 + 1 + 3
    # The loss-based warning needs no judge.
    assert [a["first_loss_rise_iteration"] for a in hacking_analysis(m)] == [1, None, 3]


def test_hacking_analysis_without_gold_makes_no_gold_claim(metrics):
    for a in hacking_analysis(_without_gold(metrics)):
        assert a["hacked"] is None and a["first_gold_drop_iteration"] is None
        assert "gold accuracy stayed" not in a["sentence"], a["sentence"]


def test_hacked_is_judged_against_the_base_own_gold_accuracy(metrics):
    """A weak base (a quick smoke test scores 0.13) is not declared hacked from iteration 0:
    the floor is 90% of the base's own gold accuracy, here 0.9 · 0.2 = 0.18."""
    weak = {**metrics, "base": {**metrics["base"], "gold_accuracy": 0.2}}
    for arm in weak["arms"]:
        arm["curve"] = [{**r, "gold_accuracy": 0.19} for r in arm["curve"]]
        arm["final"] = {**arm["final"], "gold_accuracy": 0.19}
    assert [a["hacked"] for a in hacking_analysis(weak)] == [False, False, False]
    for arm in weak["arms"]:
        arm["curve"][-1]["gold_accuracy"] = 0.1
    assert all(a["first_gold_drop_iteration"] == 4 for a in hacking_analysis(weak))


def _without(metrics, *keys):
    """The metrics as runs that never measured ``keys`` write them (no such keys at all)."""
    m = copy.deepcopy(metrics)
    m["base"] = {k: v for k, v in m["base"].items() if k not in keys}
    for arm in m["arms"]:
        arm["final"] = {k: v for k, v in arm["final"].items() if k not in keys}
        arm["curve"] = [{k: v for k, v in p.items() if k not in keys} for p in arm["curve"]]
    return m


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves, by file name (the real files are written too)."""
    saved = {}
    real = figures_module.save_figure

    def keep(fig, path, **kw):
        saved[path.name] = fig
        return real(fig, path, **kw)

    monkeypatch.setattr(figures_module, "save_figure", keep)
    return saved


def _texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_report_without_heldout_loss_says_what_is_missing(metrics, tmp_path, figures):
    """A real-model run evaluated without held-out images has no heldout_diffusion_loss (nor
    gold metrics): the report used to die with KeyError 'heldout_diffusion_loss'."""
    bare = _without(metrics, "heldout_diffusion_loss", "gold_accuracy", "fd")
    page = write_report(bare, tmp_path).read_text(encoding="utf-8")
    assert "no held-out diffusion loss in these runs" in _texts(figures["heldout_loss.png"])
    assert "no gold accuracy in these runs" in _texts(figures["reward_curves.png"])
    assert "no gold accuracy in these runs" in _texts(figures["pareto.png"])
    assert "No run here has gold_accuracy, heldout_diffusion_loss, fd." in page
    for a in hacking_analysis(bare):
        assert a["first_loss_rise_iteration"] is None and a["hacked"] is None
        assert a["sentence"] == (
            f"{a['label']}: no gold evaluator, so hacking is not judged; "
            "no held-out diffusion loss was measured."
        )
        assert a["sentence"] in page


def test_gold_without_heldout_loss_is_still_judged(metrics):
    analysis = hacking_analysis(_without(metrics, "heldout_diffusion_loss"))
    assert [a["hacked"] for a in analysis] == [True, False, True]
    assert [a["first_gold_drop_iteration"] for a in analysis] == [3, None, 1]
    assert analysis[0]["sentence"] == (
        "flow_grpo(beta_kl=0.01) hacked the reward: gold accuracy fell below 0.85 at "
        "iteration 3; no held-out diffusion loss was measured."
    )
    assert analysis[1]["sentence"] == (
        "ddrl(data_beta=0.3) did not hack: gold accuracy stayed \u2265 0.85 (final 0.97); "
        "no held-out diffusion loss was measured."
    )


@pytest.mark.parametrize("gold", [True, False])
def test_report_emits_no_warnings(metrics, tmp_path, gold):
    """matplotlib's "No artists with labels found to put in legend" came from legends asked
    of empty panels; a legend is now drawn only where something is labelled."""
    m = metrics if gold else _without(metrics, "gold_accuracy", "fd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(m, tmp_path)
        write_report(_without(m, "heldout_diffusion_loss"), tmp_path / "no_loss")


def test_pareto_labels_live_in_one_legend_outside_the_panels(metrics, tmp_path, figures):
    """Text beside each point overlapped where arms ended close together and piled onto the
    legend inside the panel; now every arm is one entry of a legend under the panels."""
    for arm in metrics["arms"]:  # every arm ends at the same point
        arm["final"].update(proxy_reward=0.5, gold_accuracy=0.9, diversity=3.0)
    write_report(metrics, tmp_path)
    fig = figures["pareto.png"]
    assert not _texts(fig)  # no annotations in the panels
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == [*(arm_label(a) for a in metrics["arms"]), "base"]
    # Later arms are drawn smaller on top, so coinciding points stay visible as rings.
    sizes = [c.get_sizes()[0] for c in fig.axes[0].collections[:3]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3


def test_narrow_ranges_get_few_short_tick_labels(metrics, tmp_path, figures):
    """The quick classifier regime's final rewards (these) got nine ticks 0.16425, 0.16450, ...
    that ran together."""
    metrics["base"] = {**metrics["base"], "proxy_reward": 0.16607}
    for arm, r in zip(metrics["arms"], (0.164549, 0.164548, 0.164416), strict=True):
        arm["final"]["proxy_reward"] = r
    write_report(metrics, tmp_path)
    ax = figures["pareto.png"].axes[0]
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert 3 <= len(labels) <= 6, labels
    assert all(len(s) <= 6 for s in labels), labels  # e.g. 0.1645, never 0.16425


def test_metrics_table_scrolls_instead_of_overflowing(metrics, tmp_path):
    page = write_report(metrics, tmp_path).read_text(encoding="utf-8")
    assert '<div class="wide"><table>' in page and ".wide{max-width:100%;overflow-x:auto}" in page
    assert "<th>heldout_<wbr>diffusion_<wbr>loss</th>" in page  # headers may wrap


def test_banner_is_shown_once_at_the_top(metrics, tmp_path):
    page = write_report(metrics, tmp_path, banner="QUICK: x < y", notes="n").read_text()
    assert page.count("QUICK: x &lt; y") == 1
    assert page.index('class="banner"') < page.index("<p>n</p>") < page.index("<h3>")


def _run_folder(path, metrics_arm, base):
    """A run folder as `ddrl train ... eval.every=1` leaves it: config.json and eval.jsonl."""
    path.mkdir(parents=True)
    save_config(
        build_config(overrides=[f"algorithm={metrics_arm['algorithm']}"]), path / "config.json"
    )
    rows = [{**base, "iteration": 0}, *metrics_arm["curve"][1:]]
    (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_of_runs_without_heldout_loss(metrics, tmp_path):
    bare = _without(metrics, "heldout_diffusion_loss", "gold_accuracy", "fd")
    runs = [_run_folder(tmp_path / f"r{i}", a, bare["base"]) for i, a in enumerate(bare["arms"])]
    path = report_runs(runs, tmp_path / "rep")
    assert path == tmp_path / "rep" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "r0: no gold evaluator, so hacking is not judged" in page
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["arms"][2]["label"] == "r2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0", "r1", "r2", "rep"]


def test_report_folder_is_whole_or_absent(metrics, tmp_path, monkeypatch):
    runs = [_run_folder(tmp_path / "r0", metrics["arms"][0], metrics["base"])]

    def dies(metrics, out_dir, *a, **kw):
        (out_dir / "reward_curves.png").write_bytes(b"half a figure")
        raise RuntimeError("disk full")

    monkeypatch.setattr(runs_report, "write_report", dies)
    with pytest.raises(RuntimeError, match="disk full"):
        report_runs(runs, tmp_path / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0"]  # no rep, no rep.tmp<pid>
    monkeypatch.undo()
    # An existing --out, even empty, is refused in one line and left as it was.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mine.txt").write_text("keep")
    one_line_error(report_runs, runs, tmp_path / "old", match=("old already exists", "new folder"))
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["mine.txt"]


def test_report_of_a_real_model_run_without_heldout_images(tmp_path, capsys):
    """The issue's reproduction: tiny SD3, evaluated every iteration, no data.eval_images."""
    run, rep = tmp_path / "E", tmp_path / "REP"
    argv = ["train", "--out", str(run), "--preset", "tiny-sd3", "eval.every=1"]
    assert main([*argv, "train.iterations=2", "train.progress=false"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["report", str(run), "--out", str(rep)]) == 0
    page = (rep / "report.html").read_text(encoding="utf-8")
    assert "E: no gold evaluator, so hacking is not judged; no held-out diffusion" in page
    assert 'src="../E/samples_final.png"' in page
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(rep)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddrl: error: --out") and "\n" not in err
