"""`ddrl compare` (and demo, long) overrides: every one reaches every regime, or is refused in
one line naming the regime that cannot take it, before anything runs."""

from __future__ import annotations

import json

import pytest

from ddrl.cli import main
from ddrl.experiments.compare import QUICK_TOY_BANNER, run_compare

# The toy2d regime at the size of a smoke test; overrides carry it there.
TINY_TOY = ["train.iterations=2", "pretrain.steps=20"]


def _toy(out, *overrides) -> dict:
    metrics = run_compare(
        out, quick=True, rewards=["toy2d"], overrides=[*TINY_TOY, *overrides], log=lambda *a: None
    )
    return {row["arm"]: row["weights"] for row in metrics["toy2d"]["table"]}


def test_overrides_reach_the_toy2d_regime(tmp_path):
    """`ddrl compare --rewards toy2d seed=90210 pretrain.seed=4242` used to train the toy arms
    without them: the mode weights matched the README's to the last digit."""
    plain = _toy(tmp_path / "plain")
    seeded = _toy(tmp_path / "seeded", "seed=90210", "pretrain.seed=4242")
    arms = sorted(p for p in (tmp_path / "seeded" / "toy2d").iterdir() if p.is_dir())
    assert len(arms) == 3
    for arm in arms:
        cfg = json.loads((arm / "config.json").read_text())
        assert (cfg["seed"], cfg["pretrain"]["seed"], cfg["train"]["iterations"]) == (
            90210,
            4242,
            2,
        )
    # Another base (pretrain.seed) and other training noise (seed): other measured weights.
    assert plain.keys() == seeded.keys()
    assert all(plain[arm] != seeded[arm] for arm in plain), (plain, seeded)
    page = (tmp_path / "seeded" / "report.html").read_text(encoding="utf-8")
    assert page.count("QUICK MODE") == 1 and QUICK_TOY_BANNER in page


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["compare", "--rewards", "toy2d", "reward.name=ink"], "toy2d regime"),
        (["compare", "--rewards", "ink", "model.name=toy2d"], "ink regime"),
        (["compare", "--rewards", "toy2d", "algorithm=grpo"], "toy2d regime"),
        (["compare", "--rewards", "classifier,toy2d", "loss.data_beta=0.5"], "regime classifier:"),
        (["compare", "--rewards", "toy2d", "loss.beta_kl=1"], "regime toy2d:"),
        (["compare", "--rewards", "ink,nope"], "regime nope:"),
        (["demo", "preset=toy2d"], "ink regime"),
        (["long", "--rewards", "classifier", "seed=3"], "classifier regime"),
    ],
)
def test_an_override_a_regime_cannot_take_is_refused_first(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    code = main([argv[0], "--quick", "--out", str(out), *argv[1:]])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddrl: error:"), err
    assert needle in lines[0], lines[0]
    key = argv[-1].split("=")[0]
    if key != "--rewards" and "=" in argv[-1]:
        assert key in lines[0], lines[0]
    assert not out.exists()  # nothing ran
