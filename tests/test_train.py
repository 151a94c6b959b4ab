"""Integration tests of the one training loop on the embedded digits task (tiny budgets), and
of the checkpoint format it resumes from (parts keyed by parameter name, SHA-256, base
fingerprint)."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import run_quick
from helpers_quick import quick

from ddrl.cli.evaluate import evaluate_run
from ddrl.config import build_config
from ddrl.dist.checkpoint import latest_checkpoint, load_checkpoint
from ddrl.errors import DDRLError
from ddrl.models import load_generator
from ddrl.training.components import load_base
from ddrl.training.ema import EMA
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl
from ddrl.training.state import TrainState

QUIET = {"log": lambda *a: None}


def _params_with_gradient(gen) -> set[str]:
    """Denoiser parameters that receive a non-zero gradient from the flow-matching loss."""
    den = gen.denoiser
    x, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    cond = gen.conditioner.encode([str(i % 10) for i in range(8)])
    den.velocity(x, t, cond).pow(2).mean().backward()
    got = {n for n, p in den.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    den.zero_grad(set_to_none=True)
    return got


def _assert_same(a, b, where: str) -> None:
    """Nested state dicts (tensors, dicts, sequences, scalars) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):  # JSON keeps no tuples (AdamW's betas)
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# The loss terms (metrics ``loss_<term>``) each algorithm reduces.
LOSS_TERMS = {
    "ddrl": {"loss_policy", "loss_data"},
    "flow_grpo": {"loss_policy", "loss_kl"},
    "dance_grpo": {"loss_policy"},
    "sft": {"loss_data"},
}


@pytest.mark.parametrize("algorithm", ["ddrl", "flow_grpo", "dance_grpo", "sft"])
def test_every_parameter_changes(tmp_path, algorithm):
    cfg, out, row = run_quick(
        tmp_path, algorithm, f"algorithm={algorithm}", "optim.weight_decay=0", "optim.lr=1e-3"
    )
    base, _ = load_base(cfg, **QUIET)
    params = dict(base.denoiser.named_parameters())
    # SD3's last joint block is context_pre_only: its context-stream query never reaches the
    # output, so diffusers' model has two parameters no loss can train (true of real SD3 too).
    last = base.arch.num_layers - 1
    dead = {
        f"transformer.transformer_blocks.{last}.attn.add_q_proj.{w}" for w in ("weight", "bias")
    }
    assert set(params) - _params_with_gradient(base) == dead
    meta, parts = load_checkpoint(out / "checkpoints" / "step-000002")
    after = parts["model"]
    assert meta["iteration"] == 2 and meta["algorithm"] == algorithm
    assert set(after) == set(params)  # every denoiser parameter, keyed by its name
    unchanged = [k for k in params if k not in dead and torch.equal(params[k].detach(), after[k])]
    assert unchanged == [], f"{algorithm}: parameters not trained: {unchanged}"
    assert row["iteration"] == 2 and torch.isfinite(torch.tensor(row["loss"]))
    assert torch.isfinite(torch.tensor(row["grad_norm"]))
    assert {k for k in row if k.startswith("loss_")} == LOSS_TERMS[algorithm]
    has_policy = "loss_policy" in LOSS_TERMS[algorithm]
    assert ("ratio_dev_mean" in row) == has_policy and ("clipped_mean" in row) == has_policy
    # The shipped model: the trained denoiser (no EMA here), the conditioner frozen at the base.
    final = load_generator(out / "final")
    for k, p in final.denoiser.named_parameters():
        assert torch.equal(p.detach(), after[k]), k
    for k, v in final.conditioner.state_dict().items():
        assert torch.equal(v, base.conditioner.state_dict()[k]), f"conditioner {k} changed"


def test_on_policy_ratio_is_exactly_one(tmp_path):
    _, out, _ = run_quick(tmp_path, "r", "algorithm=ddrl")
    for r in read_jsonl(out / "metrics.jsonl"):
        # ratio_dev = |ρ − 1|: one update per rollout batch ⇒ ρ ≡ 1, nothing clipped.
        assert r["ratio_dev_mean"] == pytest.approx(0.0, abs=1e-6)
        assert r["ratio_dev_max"] < 1e-5 and r["clipped_mean"] == 0.0


def test_resume_reproduces_uninterrupted_run(tmp_path):
    ov = (
        "algorithm=ddrl",
        "train.iterations=4",
        "train.checkpoint_every=2",
        "optim.ema_decay=0.9",
        "eval.every=2",
    )
    cfg, full, _ = run_quick(tmp_path, "full", *ov)
    cfg_half = build_config(overrides=quick(*ov, "train.iterations=2"))
    half = prepare_run_dir(tmp_path / "half", resume=False, overwrite=False)
    train(cfg_half, half, **QUIET)
    cfg_half.train.iterations = 4
    train(cfg_half, half, resume=True, **QUIET)
    meta_a, a = load_checkpoint(full / "checkpoints" / "step-000004")
    meta_b, b = load_checkpoint(half / "checkpoints" / "step-000004")
    assert set(a) == {"model", "ema", "optimizer", "rng"}
    # "rng" is the process-global torch RNG, which the loop never draws from (its randomness
    # is keyed by (seed, iteration)); it depends on what the process did before, so it is not
    # compared. Everything the run's future depends on is, bit for bit.
    for name in ("model", "ema", "optimizer"):
        _assert_same(a[name], b[name], name)
    # The tensor file itself is identical too, so its recorded SHA-256 agrees.
    assert meta_a["sha256"]["dcp/__0_0.distcp"] == meta_b["sha256"]["dcp/__0_0.distcp"]
    assert meta_a["base_fingerprint"] == meta_b["base_fingerprint"]
    assert meta_a["iteration"] == meta_b["iteration"] == 4
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]  # noqa: E731
    assert strip(read_jsonl(full / "metrics.jsonl")) == strip(read_jsonl(half / "metrics.jsonl"))
    evals = read_jsonl(full / "eval.jsonl")
    assert [r["iteration"] for r in evals] == [0, 2, 4]
    assert evals == read_jsonl(half / "eval.jsonl")
    # The shipped model is the EMA of the weights, the same after a resume.
    fa, fb = load_generator(full / "final"), load_generator(half / "final")
    for k, p in fa.denoiser.named_parameters():
        assert torch.equal(p.detach(), a["ema"][k]), k
        assert torch.equal(p.detach(), dict(fb.denoiser.named_parameters())[k].detach()), k
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])
    # `ddrl eval` of the run scores the EMA weights, as the loop's own last evaluation did.
    ev = evaluate_run(full)
    assert ev["ema"] is True and ev["iteration"] == 4
    for k in ("proxy_reward", "heldout_diffusion_loss", "gold_accuracy", "fd"):
        assert ev[k] == pytest.approx(evals[-1][k], rel=1e-6), k


def _tiny_state(tmp_path, gen, ema_decay=0.9):
    """A TrainState over the tiny toy denoiser after one AdamW step (so the optimizer and the
    EMA have state)."""
    den = gen.denoiser
    opt = torch.optim.AdamW(den.parameters(), lr=1e-2)
    ema = EMA(den, ema_decay)
    state = TrainState(tmp_path / "run", den, opt, ema, "ddrl")
    den.velocity(torch.randn(4, 2), torch.rand(4), None).pow(2).mean().backward()
    opt.step()
    ema.update(den)
    return state


def test_checkpoint_roundtrip_is_exact(tmp_path, tiny_model):
    from ddrl.models.toy2d import Toy2DGenerator

    state = _tiny_state(tmp_path, tiny_model)
    path = state.save(7, keep=2)
    assert latest_checkpoint(tmp_path / "run") == path
    saved = {k: v.detach().clone() for k, v in tiny_model.denoiser.state_dict().items()}
    saved_ema = {k: v.clone() for k, v in state.ema.shadow.items()}
    saved_rng = torch.get_rng_state()
    torch.rand(3)  # move the global RNG on: restore must bring it back
    # A fresh state over the same base (same fingerprint), trained elsewhere: restore wins.
    torch.manual_seed(0)
    other = Toy2DGenerator(hidden=16)
    fresh = TrainState(tmp_path / "run", other.denoiser, None, None, "ddrl")
    assert fresh.base_fingerprint == state.base_fingerprint
    opt = torch.optim.AdamW(other.denoiser.parameters(), lr=1e-2)
    fresh = TrainState(tmp_path / "run", other.denoiser, opt, EMA(other.denoiser, 0.9), "ddrl")
    assert fresh.restore() == 7
    for k, v in other.denoiser.state_dict().items():
        assert torch.equal(v, saved[k]), k
    _assert_same(fresh.ema.shadow, saved_ema, "ema")
    assert torch.equal(torch.get_rng_state(), saved_rng)
    _assert_same(opt.state_dict(), state.opt.state_dict(), "optimizer")


def test_resume_refuses_a_different_base(tmp_path, tiny_model):
    from ddrl.models.toy2d import Toy2DGenerator

    state = _tiny_state(tmp_path, tiny_model)
    path = state.save(3, keep=2)
    torch.manual_seed(1)  # another base model: same architecture, other weights
    other = Toy2DGenerator(hidden=16).denoiser
    opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    wrong = TrainState(tmp_path / "run", other, opt, None, "ddrl")
    assert wrong.base_fingerprint != state.base_fingerprint
    with pytest.raises(DDRLError, match="trained from base"):
        wrong.restore(path)


def test_corrupted_checkpoint_file_is_detected_by_its_checksum(tmp_path, tiny_model):
    state = _tiny_state(tmp_path, tiny_model)
    path = state.save(1, keep=2)
    load_checkpoint(path)  # intact: loads
    shard = path / "dcp" / "__0_0.distcp"
    md = dcp.FileSystemReader(path / "dcp").read_metadata().state_dict_metadata
    read = lambda: {k: torch.zeros(v.size, dtype=v.properties.dtype) for k, v in md.items()}  # noqa: E731
    before = read()
    dcp.load(before, checkpoint_id=path / "dcp", no_dist=True)
    meta = dcp.FileSystemReader(path / "dcp").read_metadata()
    item = max(meta.storage_data.values(), key=lambda info: info.length)  # the largest tensor
    raw = bytearray(shard.read_bytes())
    raw[item.offset + item.length // 2] ^= 0x01  # one bit of its data: still well-formed
    shard.write_bytes(bytes(raw))
    after = read()
    dcp.load(after, checkpoint_id=path / "dcp", no_dist=True)  # DCP alone does not notice
    assert any(not torch.equal(before[k], after[k]) for k in before)  # only the hash can tell
    with pytest.raises(DDRLError, match="SHA-256"):
        load_checkpoint(path)
    with pytest.raises(DDRLError, match="SHA-256"):
        state.restore()
    # A torn state.json is reported as a corrupt checkpoint, not a traceback.
    (path / "state.json").write_text('{"iteration": 1, "skel')
    with pytest.raises(DDRLError, match="corrupt"):
        load_checkpoint(path)


def test_run_seed_changes_the_rollouts_not_the_base(tmp_path):
    rows, fingerprints = [], []
    for seed in (0, 1):
        _, out, row = run_quick(tmp_path, f"s{seed}", f"seed={seed}", "train.iterations=1")
        rows.append(row)
        fingerprints.append(load_checkpoint(latest_checkpoint(out))[0]["base_fingerprint"])
    assert fingerprints[0] == fingerprints[1]
    assert rows[0]["reward_mean"] != rows[1]["reward_mean"]


def test_toy_reward_rises(tmp_path):
    """GRPO on the 2-D toy with reward = x: the mean reward must go up."""
    cfg, out, _ = run_quick(
        tmp_path,
        "toy",
        "preset=toy2d",
        "algorithm=grpo",
        "pretrain.steps=400",
        "pretrain.batch_size=256",
        "train.iterations=15",
        "train.prompts_per_iter=4",
        "train.group_size=16",
        "optim.lr=3e-3",
        "sampler.num_steps=6",
    )
    rows = read_jsonl(out / "metrics.jsonl")
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.2, (first, last)


def test_nan_reward_group_is_skipped_and_logged(tmp_path):
    logs = []
    cfg = build_config(  # (the preflight would refuse a NaN reward before iteration 1)
        overrides=quick("reward.name=plugins_for_tests:nan_first_group", "train.preflight=false")
    )
    out = prepare_run_dir(tmp_path / "nan", resume=False, overwrite=False)
    row = train(cfg, out, log=logs.append)
    assert row["skipped_groups"] == 1
    assert any("skipped 1 group" in m for m in logs)
    assert all(
        json.loads(line)["skipped_groups"] == 1
        for line in (out / "metrics.jsonl").read_text().splitlines()
    )


def test_heldout_loss_of_trained_base_beats_random_init(tmp_path):
    """The held-out diffusion loss must rank a (briefly) trained base above a random model."""
    from ddrl.data.pools import load_data
    from ddrl.evaluation.metrics import default_t_grid, heldout_diffusion_loss
    from ddrl.models.digits import DigitsGenerator

    cfg = build_config(overrides=quick())
    base, _ = load_base(cfg, **QUIET)
    torch.manual_seed(0)
    random_model = DigitsGenerator(base.arch).eval()
    held = load_data("digits").heldout

    def loss(gen):
        cond = gen.conditioner.encode(held.prompts)
        with torch.no_grad():
            return heldout_diffusion_loss(
                lambda x, t, i: gen.denoiser.velocity(x, t.float(), cond.index(i)),
                gen.codec.encode(held.x),
                default_t_grid(5),
            )

    trained, rand = loss(base), loss(random_model)
    assert trained < 0.8 * rand, (trained, rand)


def test_toy2d_eval_writes_scatter(tmp_path):
    cfg, out, _ = run_quick(
        tmp_path,
        "toy_eval",
        "preset=toy2d",
        "algorithm=ddrl",
        "pretrain.steps=50",
        "eval.every=1",
        "eval.samples_per_prompt=50",
    )
    assert (out / "samples_final.png").stat().st_size > 0
    rows = read_jsonl(out / "eval.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert 0.0 <= rows[-1]["gold_accuracy"] <= 1.0
    # R² has no valid range: no saturation to measure, nothing is out of range.
    assert "saturation_rate" not in rows[-1] and rows[-1]["out_of_range_rate"] == 0.0


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = run_quick(
        tmp_path, "tb", "train.tensorboard=true", "eval.every=1", "watch.rules=diversity>0:warn"
    )
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"reward_mean", "grad_norm", "loss_policy", "eval/gold_accuracy"} <= tags
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2]
    # every evaluation's sample grid, and the watch's firing (at iteration 1: rules count
    # from the first evaluation after the base)
    assert [e.step for e in acc.Images("eval/samples")] == [0, 1, 2]
    assert [e.step for e in acc.Scalars("watch/diversity")] == [1]
