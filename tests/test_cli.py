"""The `ddrl` command end to end in quick mode, and its one-line errors for bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_quick import quick

from ddrl.cli import main
from ddrl.training.runlog import read_jsonl

SCHEMA_KEYS = {"proxy_reward", "gold_accuracy", "diversity", "heldout_diffusion_loss", "fd"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("ddrl: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_train_eval_resume_cli(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--out", run_dir, *quick())[0] == 0
    assert (run_dir / "config.json").is_file() and (run_dir / "final" / "generator.json").is_file()
    assert run(capsys, "eval", run_dir)[0] == 0
    first = (run_dir / "eval.json").read_text()
    assert run(capsys, "eval", run_dir)[0] == 0
    assert (run_dir / "eval.json").read_text() == first, "eval.json must be deterministic"
    # overrides may follow options; eval.seed changes the samples, so the file must change
    assert run(capsys, "eval", run_dir, "--out", tmp_path / "e.json", "eval.seed=7")[0] == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval_seed"] == 7
    assert run(capsys, "eval", run_dir, "eval.seed=8", "--out", tmp_path / "g.json")[0] == 0
    assert json.loads((tmp_path / "g.json").read_text())["eval_seed"] == 8
    assert "may only change" in error_line(
        capsys, "eval", run_dir, "--out", tmp_path / "f.json", "train.iterations=3"
    )
    ev = json.loads(first)
    assert SCHEMA_KEYS <= set(ev) and ev["iteration"] == 2
    assert ev["ema"] is False and ev["model"] == "digits" and ev["data"] == "digits"
    assert ev["checkpoint"].endswith("step-000002")
    assert (run_dir / "eval_samples.png").stat().st_size > 0
    # The shipped model folder evaluates on its own (no run config, no cached base) and, with
    # the run's evaluation settings, scores exactly what the run's last checkpoint scored.
    same = ["eval.samples_per_prompt=3", "sampler.eval_steps=4"]
    assert run(capsys, "eval", run_dir / "final", "--out", tmp_path / "m.json", *same)[0] == 0
    mf = json.loads((tmp_path / "m.json").read_text())
    assert mf["model_dir"] == str(run_dir / "final") and "iteration" not in mf
    assert mf["model"] == "digits" and mf["data"] == "digits" and "task" not in mf
    for k in SCHEMA_KEYS:
        assert mf[k] == pytest.approx(ev[k], rel=1e-6), k
    assert "--step does not apply" in error_line(capsys, "eval", run_dir / "final", "--step", "2")
    assert run(capsys, "train", "--out", run_dir, "--resume", "train.iterations=3")[0] == 0
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iteration"] for r in rows] == [1, 2, 3]
    assert "--resume may only change train.iterations" in error_line(
        capsys, "train", "--out", run_dir, "--resume", "optim.lr=1"
    )
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(run_dir), "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run(capsys, "demo", "--quick", "--out", out)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "ddrl", "grpo"):
        assert {"proxy_reward", "gold_accuracy", "diversity", "seconds"} <= set(summary[name])
    assert (out / "report.html").is_file() and (out / "samples_base.png").is_file()
    assert "The watch" in (out / "report.html").read_text()  # each arm's watch.jsonl read
    assert (out / "votes" / "manifest.json").is_file()  # ready for `ddrl vote serve`


@pytest.mark.slow  # 30 s: `make test` stays under its 10 minutes (`make test-slow` runs it)
def test_compare_quick_schema(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = run(capsys, "compare", "--quick", "--rewards", "ink,classifier", "--out", out)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert SCHEMA_KEYS <= set(m["base"])
    assert m["arms"] and set(m["regimes"]) == {"ink", "classifier"}
    for arm in m["arms"]:
        assert isinstance(arm["algorithm"], str) and isinstance(arm["setting"], dict)
        assert SCHEMA_KEYS <= set(arm["final"])
        assert arm["curve"] and all(
            "iteration" in p and SCHEMA_KEYS <= set(p) for p in arm["curve"]
        )
    for f in (
        "report.html",
        "reward_curves_ink.png",
        "pareto_ink.png",
        "heldout_loss_ink.png",
        "reward_curves_classifier.png",
    ):
        assert (out / f).stat().st_size > 0, f


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--out", "{tmp}/a", "algorithm=nope"], "'nope'"),
        (["train", "--out", "{tmp}/a", "reward.name=nope"], "'nope'"),
        (["train", "--out", "{tmp}/a", "model.name=nope", "model.base={tmp}"], "'nope'"),
        (["train", "--out", "{tmp}/a", "model.name=plugins_for_tests:wrong_shape"], "Generator"),
        (["train", "--out", "{tmp}/a", "train.iterations=abc"], "'abc'"),
        (["train", "--out", "{tmp}/a", "train.group_size=1"], "train.group_size=1"),
        (["train", "--out", "{tmp}/a", "sampler.sde.kind=ode"], "'ode'"),
        (["train", "--out", "{tmp}/a", "sampler.sde.eta=0.3"], "'sampler.sde.eta'"),
        (["train", "--out", "{tmp}/a", "sampler.sde=ode"], "sampler.sde.kind"),
        (["train", "--out", "{tmp}/a", "loss.beta_kl=0.1"], "'loss.beta_kl'"),
        (["train", "--out", "{tmp}/a", "--preset", "cats"], "'cats'"),
        (["train", "--out", "{tmp}/a", "task=toy2d"], "'task'"),
        (["train", "--out", "{tmp}/a", "train.bogus=1"], "'train.bogus'"),
        (["train", "--out", "{tmp}/a", "--config", "{tmp}/missing.toml"], "missing.toml"),
        (["train", "--out", "{tmp}/a", "model.base={tmp}/nomodel"], "nomodel"),
        (["eval", "{tmp}/nothing"], "nothing"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, capsys, argv, needle):
    argv = [a.format(tmp=tmp_path) for a in argv]
    # Quick settings keep a failure from pretraining a full base, but never mask the bad value.
    keys = {a.split("=")[0] for a in argv if "=" in a}
    line = error_line(capsys, *argv, *[q for q in quick() if q.split("=")[0] not in keys])
    assert needle in line


@pytest.mark.parametrize(
    # (2, 2): the preflight's probe of 2 samples meets it before iteration 1
    "plugin, needle",
    [("wrong_shape", "shape (2, 2)"), ("not_a_tensor", "returned list")],
)
def test_bad_reward_output(tmp_path, capsys, plugin, needle):
    line = error_line(
        capsys, "train", "--out", tmp_path / "r", *quick(f"reward.name=plugins_for_tests:{plugin}")
    )
    assert needle in line


def test_run_folder_never_overwritten_and_checkpoints_checked(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--out", run_dir, *quick())[0] == 0
    assert "already exists" in error_line(capsys, "train", "--out", run_dir, *quick())
    # --overwrite keeps the old run as a backup
    assert run(capsys, "train", "--out", run_dir, "--overwrite", *quick())[0] == 0
    assert len(list(tmp_path.glob("run.bak-*"))) == 1
    ckpt = run_dir / "checkpoints" / "step-000002"
    # A damaged file is caught by its SHA-256 before it is parsed; a torn state.json as corrupt.
    model_file = ckpt / "dcp" / "__0_0.distcp"
    intact = model_file.read_bytes()
    model_file.write_bytes(b"garbage")
    assert "SHA-256 mismatch" in error_line(capsys, "eval", run_dir)
    assert "SHA-256 mismatch" in error_line(
        capsys, "train", "--out", run_dir, "--resume", "train.iterations=3"
    )
    model_file.write_bytes(intact)
    (ckpt / "state.json").write_text("{")
    assert "corrupt" in error_line(capsys, "eval", run_dir)
    assert "--step 7: no such checkpoint" in error_line(capsys, "eval", run_dir, "--step", "7")
    assert "--resume step-000009: no such checkpoint; allowed: auto, or one of step-000002" in (
        error_line(capsys, "train", "--out", run_dir, "--resume", "step-000009")
    )
    # Killed before its first checkpoint: `--resume` (auto) starts the run over, in place.
    shutil.rmtree(run_dir / "checkpoints")
    code, out, err = run(capsys, "train", "--out", run_dir, "--resume")
    assert code == 0 and f"no checkpoint in {run_dir} yet; starting it" in out, (out, err)
    assert [r["iteration"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_synth_then_train_on_synthetic_data(tmp_path, capsys):
    pool = tmp_path / "synthetic.safetensors"
    code, out, err = run(capsys, "synth", "--per-prompt", 3, "--out", pool, *quick())
    assert code == 0, err
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ddrl.data.pool_io import load_pool

    t = load_file(pool)
    with safe_open(str(pool), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])  # the prompts, as strings
    assert t["x"].shape == (30, 1, 8, 8) and len(prompts) == 30
    assert sorted(set(prompts)) == [str(i) for i in range(10)]
    loaded = load_pool(pool)
    assert torch.equal(loaded.x, t["x"]) and loaded.prompts == prompts
    run_dir = tmp_path / "syn"
    code, _, err = run(
        capsys,
        "train",
        "--out",
        run_dir,
        "data.source=synthetic",
        f"data.synthetic_path={pool}",
        *quick(),
    )
    assert code == 0, err
    assert "no synthetic data" in error_line(
        capsys,
        "train",
        "--out",
        tmp_path / "x",
        "data.source=synthetic",
        f"data.synthetic_path={tmp_path}/none.safetensors",
        *quick(),
    )


def test_preset_flag_selects_the_model_family(tmp_path, capsys):
    code, out, err = run(capsys, "pretrain", "--preset", "toy2d", "pretrain.steps=20")
    assert code == 0, err
    base = Path(out.strip().splitlines()[-1])
    assert json.loads((base / "generator.json").read_text())["type"] == "toy2d"
    assert json.loads((base / "pretrain.json").read_text())["data"] == "toy2d"


def test_plugin_model_family_trains_and_evaluates(tmp_path, capsys):
    from plugins_for_tests import PluginToy

    torch.manual_seed(0)
    base = tmp_path / "base"
    PluginToy(hidden=16).save_pretrained(base)
    run_dir = tmp_path / "run"
    plugin = ("--preset", "toy2d", "model.name=plugins_for_tests:PluginToy", f"model.base={base}")
    code, _, err = run(capsys, "train", "--out", run_dir, *plugin, *quick())
    assert code == 0, err
    # Saved by the plugin's own save_pretrained, in its own layout.
    assert (run_dir / "final" / "plugin.json").is_file()
    assert not (run_dir / "final" / "generator.json").exists()
    final = PluginToy.from_pretrained(run_dir / "final")
    assert not torch.equal(
        final.denoiser.net[0].weight, PluginToy.from_pretrained(base).denoiser.net[0].weight
    )
    code, out, err = run(capsys, "eval", run_dir)
    assert code == 0, err
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["model"] == "plugins_for_tests:PluginToy" and ev["data"] == "toy2d"
    assert "saturation_rate" not in ev  # R² has no valid range


def test_plugin_model_without_base_fails_cleanly_or_pretrains(tmp_path, capsys):
    argv = ["train", "--out", tmp_path / "p", "--preset", "toy2d"]
    code, _, err = run(capsys, *argv, "model.name=plugins_for_tests:PluginToy", *quick())
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1), err


def test_synthetic_pool_roundtrip_keeps_any_prompt_strings(tmp_path):
    from ddrl.data.pool_io import load_pool, save_pool
    from ddrl.data.pools import PairedPool
    from ddrl.errors import DDRLError

    prompts = ["a cat, on a mat", 'ünïcødé "quoted"\n', "", "a cat, on a mat"]
    pool = PairedPool(torch.randn(4, 3), prompts)
    save_pool(pool, tmp_path / "p.safetensors")
    back = load_pool(tmp_path / "p.safetensors")
    assert back.prompts == prompts and torch.equal(back.x, pool.x)
    assert back.paired(["a cat, on a mat"], torch.Generator().manual_seed(0)).shape == (1, 3)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DDRLError, match="corrupt synthetic data"):
        load_pool(tmp_path / "bad.safetensors")


def test_synthetic_pool_is_stored_in_the_codec_range(tiny_digits):
    from ddrl.config.core import SamplerConfig
    from ddrl.data.synthetic import generate_pool

    pool = generate_pool(tiny_digits, ["0", "1"], 4, SamplerConfig(eval_steps=2), seed=0)
    lo, hi = tiny_digits.codec.value_range
    assert pool.x.shape == (8, 1, 8, 8)
    assert float(pool.x.min()) >= lo and float(pool.x.max()) <= hi  # like a decoded image


def _clean_exit(code: int, err: str) -> bool:
    """Success, or the one-line user error: never a traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln]
    one_line = code == 2 and len(lines) == 1 and lines[0].startswith("ddrl: error:")
    return "Traceback" not in err and (code == 0 or one_line)


@pytest.fixture
def toy_model_dir(tmp_path):
    """A saved toy2d model folder (untrained; evaluation only needs it to load)."""
    from ddrl.models.toy2d import Toy2DGenerator

    torch.manual_seed(0)
    Toy2DGenerator(hidden=16).save_pretrained(tmp_path / "toy")
    return tmp_path / "toy"


TOY_EVAL = ["eval.samples_per_prompt=3", "sampler.eval_steps=4"]


def test_eval_of_a_toy2d_model_folder(tmp_path, capsys, toy_model_dir):
    out = tmp_path / "e.json"
    code, _, err = run(capsys, "eval", toy_model_dir, "--out", out, "preset=toy2d", *TOY_EVAL)
    assert code == 0, err
    ev = json.loads(out.read_text())
    assert ev["model_dir"] == str(toy_model_dir) and ev["model"] == ev["data"] == "toy2d"
    assert "saturation_rate" not in ev and 0.0 <= ev["gold_accuracy"] <= 1.0


def test_eval_honours_the_preset_flag(tmp_path, capsys, toy_model_dir):
    out = tmp_path / "e.json"
    code, _, err = run(capsys, "eval", toy_model_dir, "--out", out, "--preset", "toy2d", *TOY_EVAL)
    assert code == 0 and json.loads(out.read_text())["data"] == "toy2d", err


def test_eval_of_a_model_folder_of_another_family_fails_cleanly(tmp_path, capsys, toy_model_dir):
    code, _, err = run(capsys, "eval", toy_model_dir, "--out", tmp_path / "e.json", *TOY_EVAL)
    assert _clean_exit(code, err), err


def test_compare_without_gold_fails_cleanly(tmp_path, capsys):
    argv = ["compare", "--quick", "--rewards", "ink", "--out", tmp_path / "cmp", "gold.name="]
    code, _, err = run(capsys, *argv)
    assert _clean_exit(code, err), err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import ddrl.cli.config as config_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_cmd, "cmd_presets", interrupted)
    assert main(["presets"]) == 130
    assert "interrupted; the last checkpoint is intact" in capsys.readouterr().err
