"""Data parallel training (``ddrl.dist.group``): two gloo processes on the CPU take the same
steps as one process on the same global batch."""

import copy
import gc
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_quick import quick
from safetensors.torch import load_file

from ddrl.advantages import combine_advantages
from ddrl.config import build_config, load_config
from ddrl.config.core import AdvantageConfig
from ddrl.dist.checkpoint import latest_checkpoint, load_checkpoint
from ddrl.dist.config import ParallelConfig
from ddrl.dist.group import batch_slice, gathered_advantages
from ddrl.dist.parallel import Parallel
from ddrl.errors import DDRLError
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir, read_jsonl

# 3 prompts × 4 samples over 2 ranks: rank 0 holds group 0 and half of group 1, rank 1 the rest.
SETUP = ["train.iterations=3", "train.prompts_per_iter=3", "train.group_size=4"]
PARAM_TOL = 1e-5  # the summation order of the gradients differs (float32 rounding only)

pytestmark = pytest.mark.distributed  # several processes (gloo); `-m 'not distributed'` skips them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_group(rank: int, port: int, fn, *args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
        gc.collect()  # DDP / FSDP objects (their comm threads) go before the group does
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Checks passed: leave without the interpreter's teardown, where a C++ thread of the
    # gloo/DDP machinery once aborted the process ("terminate called without an active
    # exception", 1 run in ~20) after every assertion had passed.
    os._exit(0)


def _check_split_group(rank: int) -> None:
    for how in ("flow_grpo", "cosmos_rl"):
        _check_advantages(rank, how)
    with pytest.raises(DDRLError, match="split evenly over 2 processes"):
        batch_slice(7)
    # DDP sums the gradients over ranks (not the mean), once, in the last backward of a step.
    den = _Lin()
    par = Parallel(ParallelConfig(strategy="ddp"), "cpu")
    wrapped = par.wrap(den)
    xs = [torch.full((1, 2), float(r + 1)) for r in range(2)]  # rank r's input: r + 1
    for i, now in enumerate((False, True)):  # two backwards, synchronised in the second
        with par.sync(now):
            wrapped.velocity(xs[rank] * (i + 1), None, None).sum().backward()
        if not now:  # accumulated locally only: 1·x on rank r
            assert den.lin.weight.grad.tolist() == [[rank + 1.0, rank + 1.0]]
    # Σ_ranks Σ_backwards: (1 + 2)·(1 + 2) = 9 on every rank
    assert den.lin.weight.grad.tolist() == [[9.0, 9.0]]
    for strategy in ("ddp", "fsdp"):
        _check_accumulated_gradients(rank, strategy)


def _check_accumulated_gradients(rank: int, strategy: str) -> None:
    """The digits transformer: 3 backwards of 2 forwards each (policy and data term), each rank
    on half the batch, synchronised in the last: every parameter's gradient (FSDP2: gathered
    from the shards) is the one-process gradient of the whole batch."""
    from ddrl.models.digits import DigitsGenerator

    torch.manual_seed(0)
    gen = DigitsGenerator()
    gen.conditioner.requires_grad_(False)
    x, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    cond = gen.conditioner.encode([str(i) for i in range(8)])
    whole = copy.deepcopy(gen.denoiser)
    for i in range(3):
        loss = whole.velocity(x * (i + 1), t, cond).pow(2).sum()
        (loss + whole.velocity(x / 2, t, cond).pow(2).sum()).backward()
    want = {n: p.grad for n, p in whole.named_parameters()}
    par = Parallel(ParallelConfig(strategy=strategy), "cpu")
    den = gen.denoiser
    wrapped = par.wrap(den)
    rows = torch.arange(4 * rank, 4 * rank + 4)
    for i in range(3):
        with par.sync(i == 2):
            loss = wrapped.velocity(x[rows] * (i + 1), t[rows], cond.index(rows)).pow(2).sum()
            (
                loss + wrapped.velocity(x[rows] / 2, t[rows], cond.index(rows)).pow(2).sum()
            ).backward()
    for n, p in den.named_parameters():
        got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(got, want[n], rtol=1e-4, atol=1e-4, msg=f"{strategy} {n}")


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1, bias=False)

    def velocity(self, x, t, cond):
        return self.lin(x)


def _check_advantages(rank: int, how: str) -> None:
    g = torch.Generator().manual_seed(0)
    each = torch.randn(12, 2, generator=g)  # 3 groups of 4, K = 2 rewards
    each[9, 1] = float("nan")  # group 2 (on rank 1 only) is skipped on both ranks
    w, cfg = torch.tensor([1.0, 0.5]), AdvantageConfig()
    want_adv, want_valid = combine_advantages(each, w, torch.arange(12) // 4, cfg, how)
    rows = batch_slice(12)
    assert rows == slice(6 * rank, 6 * rank + 6)
    got_each, adv, valid = gathered_advantages(each[rows], w, 4, cfg, how)
    torch.testing.assert_close(got_each, each, equal_nan=True)
    assert torch.equal(adv, want_adv) and torch.equal(valid, want_valid)
    assert valid.tolist() == [True] * 8 + [False] * 4
    # Group 1 straddles the ranks; its advantages are those of the whole group, not of halves.
    half = combine_advantages(each[4:6], w, torch.zeros(2, dtype=torch.long), cfg, how)[0]
    assert not torch.allclose(adv[4:6], half)


def test_group_split_across_ranks_normalises_whole():
    """Two gloo processes: gathered rewards give every rank the whole batch's advantages (both
    aggregations), an uneven split is refused, gradients are summed."""
    mp.spawn(_in_group, args=(_free_port(), _check_split_group), nprocs=2)


def _params(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(str(run / "final" / "**" / "*.safetensors"), recursive=True)):
        rel = Path(f).relative_to(run)
        out.update({f"{rel}:{k}": v for k, v in load_file(f).items()})
    return out


HARNESS = str(Path(__file__).with_name("kill_harness.py"))


def _torchrun(*args: str, n: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=n -m ddrl ARGS`` (one CPU thread per rank);
    ARGS starting with the harness path run it instead of ``-m ddrl``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    what = list(args) if args[0] == HARNESS else ["-m", "ddrl", *args]
    done = subprocess.run([*cmd, *what], env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _no_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _same_rows(rows1: list[dict], rows2: list[dict]) -> None:
    """Rewards of iteration 1 equal up to the float32 rounding of sampling and scoring half the
    batch at a time (measured: digits, a 2e-9 relative difference in the std; tiny SD3, whose
    rewards differ by ~1e-3 only, 8e-9 absolute in a std of 6e-4); later iterations add the
    rounding of the previous steps' gradient sums."""
    assert [r["iteration"] for r in rows2] == [r["iteration"] for r in rows1]
    for k in ("reward_mean", "reward_std"):
        assert rows2[0][k] == pytest.approx(rows1[0][k], rel=1e-6, abs=1e-7), k
    for a, b in zip(rows1, rows2, strict=True):
        for k in ("reward_mean", "reward_std", "grad_norm", "loss_data", "loss_kl"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["iteration"], k)
        # The policy term is −mean(A·ρ) with ρ ≡ 1: advantages summing to 0 per group, so its
        # value is their float32 rounding (±1e-5 at these sizes), compared in absolute terms.
        assert b["loss_policy"] == pytest.approx(a["loss_policy"], abs=1e-4), a["iteration"]
        assert b["skipped_groups"] == a["skipped_groups"]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The digits run in one process and with 2 DDP ranks (checkpoint every iteration)."""
    root = tmp_path_factory.mktemp("dp")
    overrides = quick(*SETUP, "train.checkpoint_every=1")
    one = prepare_run_dir(root / "one", resume=False, overwrite=False)
    train(build_config(overrides=overrides), one, log=lambda *a: None)  # also fills the cache
    two = root / "two"
    done = _torchrun("train", "--out", str(two), *overrides, "parallel.strategy=ddp")
    assert done.stdout.count("trained ") == 1  # rank 0 alone reports
    assert done.stderr.count("ddrl train: done in") == 1, done.stderr[-2000:]
    return overrides, one, two


def test_under_torchrun_one_rank_speaks_for_an_error(tmp_path):
    """A config error under torchrun: one `ddrl: error:` line (rank 0's), not one per rank."""
    done = _torchrun("train", "--out", str(tmp_path / "r"), "train.iterations=ten", ok=False)
    assert done.returncode != 0
    assert done.stderr.count("ddrl: error: train.iterations='ten' is not an int") == 1, done.stderr
    assert not (tmp_path / "r").exists()


def test_two_ddp_processes_take_the_single_process_steps(one_and_two):
    """torchrun, 2 gloo ranks under torch DDP vs one process: same rewards, same parameters
    (to float32 rounding of the gradient sum), one run folder written by rank 0."""
    overrides, one, two = one_and_two
    _same_rows(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))
    print("max |Δparam| one vs two:", _max_diff(_params(one), _params(two)))
    assert _max_diff(_params(one), _params(two)) < PARAM_TOL
    cfg1, cfg2 = (json.loads((r / "config.json").read_text()) for r in (one, two))
    assert cfg2.pop("parallel") == {**cfg1.pop("parallel"), "strategy": "ddp"}
    assert cfg1 == cfg2
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir()
    )
    state = json.loads((two / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["strategy"] == "ddp" and state["samples"] == 36
    # A run started on two ranks continues on one: the trajectories' noise does not depend on
    # the layout, so it ends where the one-process run ends (to the rounding of the sums).
    four = two.with_name("four")
    shutil.copytree(two, four)
    shutil.rmtree(four / "final")
    shutil.rmtree(four / "checkpoints" / "step-000003")
    resumed = load_config(four / "config.json", ["parallel.strategy=none"], ("parallel.",))
    train(resumed, four, resume=True, log=lambda *a: None)
    assert [r["iteration"] for r in read_jsonl(four / "metrics.jsonl")] == [1, 2, 3]
    assert _max_diff(_params(one), _params(four)) < PARAM_TOL


def test_two_ddp_processes_train_nft_with_the_data_term_like_one(tmp_path):
    """NFT + data term (old-policy rollouts keeping final samples only, fresh noise keyed by
    trajectory, the lagging weights swapped in on every rank) under 2 DDP ranks vs one process:
    the same rows and final weights to float32 rounding, and the same saved old policy."""
    overrides = quick(*SETUP, "algorithm=nft_data", "loss.old_rate=0.3")
    one = prepare_run_dir(tmp_path / "one", resume=False, overwrite=False)
    train(build_config(overrides=overrides), one, log=lambda *a: None)
    two = tmp_path / "two"
    _torchrun("train", "--out", str(two), *overrides, "parallel.strategy=ddp")
    _same_rows(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))
    assert _max_diff(_params(one), _params(two)) < PARAM_TOL
    _, a = load_checkpoint(latest_checkpoint(one))
    _, b = load_checkpoint(latest_checkpoint(two))
    assert _max_diff(a["loss"], b["loss"]) < PARAM_TOL


# A kill mid-iteration runs in `make test-slow` (21 s each: `make test` stays under 10 minutes)
@pytest.mark.parametrize("where", [pytest.param("iteration", marks=pytest.mark.slow), "checkpoint"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(one_and_two, where):
    """SIGKILL rank 1 in iteration 2 (after its rollout), or while checkpoint 2 is written
    (its shard on disk, the folder not yet renamed); `--resume` on 2 ranks then ends exactly
    where the uninterrupted 2-rank run ends: same metrics, bit-identical parameters."""
    overrides, _, two = one_and_two
    run = two.with_name(f"killed-{where}")
    args = ("train", "--out", str(run), *overrides, "parallel.strategy=ddp")
    died = _torchrun(HARNESS, where, "2", "1", "--", *args[1:], ok=False)
    assert died.returncode != 0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000001"]
    if where == "checkpoint":  # the killed write left its temporary folder, not a checkpoint
        assert (ckpts / ".tmp-step-000002").is_dir()
    done = _torchrun("train", "--out", str(run), "--resume", "auto")
    assert f"resuming from {ckpts / 'step-000001'}" in done.stdout
    assert _no_time(read_jsonl(run / "metrics.jsonl")) == _no_time(
        read_jsonl(two / "metrics.jsonl")
    )
    assert _max_diff(_params(two), _params(run)) == 0
    assert not list(ckpts.glob(".tmp-*"))


TINY_SD3 = [
    "--preset",
    "tiny-sd3",
    "train.iterations=3",
    "train.checkpoint_every=1",
    "train.progress=false",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["model.finetune=lora"],  # DDRL, LoRA on every block; the data term on synthetic data
        # frozen reference, 2 steps per iteration and flow_grpo's EMA schedule; each rank holds
        # whole groups (2 × 4 over 2), so "within_groups" parts are the same rows on 1 or 2 ranks
        # (30 s: marked slow with the next one to keep `make test` under its 10 minutes)
        pytest.param(
            [
                "model.finetune=full",
                "algorithm=flow_grpo",
                "train.update_split=within_groups",
                "optim.ema_decay=0.9",
                "optim.ema_every=2",
                "optim.ema_warmup=true",
            ],
            marks=pytest.mark.slow,
        ),
        # NFT + data term: old-policy rollouts with CFG, the old LoRA weights swapped into the
        # sharded model, and checkpointed (part "loss") and resharded on resume. Marked slow
        # (27 s) to keep `make test` under its 10 minutes; `make test-slow` runs it.
        pytest.param(
            ["model.finetune=lora", "algorithm=nft_data", "loss.old_rate=0.3"],
            marks=pytest.mark.slow,
        ),
    ],
    ids=["lora-ddrl", "full-flow_grpo", "lora-nft_data"],
)
def test_two_fsdp2_processes_take_the_single_process_steps(tmp_path, extra):
    """FSDP2 (fully_shard per transformer block, gloo) on the tiny SD3 over 2 ranks vs one
    process: same rewards, losses and final parameters to float32 rounding; a sharded DCP
    checkpoint resumes on one rank (resharded) and ends where the 2-rank run ends."""
    one = tmp_path / "one"
    assert (
        subprocess.run(
            [sys.executable, "-m", "ddrl", "train", "--out", str(one), *TINY_SD3, *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    two = tmp_path / "two"
    _torchrun("train", "--out", str(two), *TINY_SD3, *extra, "parallel.strategy=fsdp")
    _same_rows(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"))
    print("max |Δparam| one vs two (fsdp):", _max_diff(_params(one), _params(two)))
    assert _max_diff(_params(one), _params(two)) < PARAM_TOL
    shards = sorted(p.name for p in (two / "checkpoints" / "step-000003" / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # Resume the 2-rank checkpoint of iteration 2 on one FSDP2 rank: DCP reshards.
    three = tmp_path / "three"
    shutil.copytree(two, three)
    shutil.rmtree(three / "final")
    shutil.rmtree(three / "checkpoints" / "step-000003")
    done = _torchrun("train", "--out", str(three), "--resume", n=1)
    assert "continuing on 1 rank(s)" in done.stdout
    assert _max_diff(_params(two), _params(three)) < PARAM_TOL
