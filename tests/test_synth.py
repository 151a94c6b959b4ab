"""`synthesize`: the synthetic regulariser set, sharded, resumable, independent of chunking."""

import json

import pytest
import torch
from safetensors import safe_open

import ddrl.data.synthetic as synthetic
from ddrl.config.core import SamplerConfig
from ddrl.data.pool_io import load_pool
from ddrl.data.synthetic import generate_pool, sample_seed, synthesize
from ddrl.errors import DDRLError
from ddrl.sampling import ode_solve, sample_ode

CFG = SamplerConfig(eval_steps=2)
QUIET = {"progress": False, "log": lambda m: None}


class Stop(Exception):
    pass


def kill_after(k: int):
    """An on_shard callback that 'kills' the run after k shards were written."""
    calls = []

    def cb(done, total):
        calls.append(done)
        if len(calls) == k:
            raise Stop

    return cb


def count_chunks(monkeypatch) -> list:
    """Record the rows of every chunk the generator is run on."""
    seen, real = [], synthetic._samples

    def spy(gen, prompts, seeds, cfg, device):
        seen.append(len(prompts))
        return real(gen, prompts, seeds, cfg, device)

    monkeypatch.setattr(synthetic, "_samples", spy)
    return seen


def test_interrupted_then_resumed_equals_uninterrupted(tiny_digits, tmp_path, monkeypatch):
    prompts, args = ["0", "1", "2"], (3, CFG, 7)
    full = synthesize(tiny_digits, prompts, *args, tmp_path / "a.safetensors", chunk=2, **QUIET)
    assert full.x.shape == (9, 1, 8, 8) and full.prompts == [p for p in prompts for _ in "abc"]
    lo, hi = tiny_digits.codec.value_range
    assert float(full.x.min()) >= lo and float(full.x.max()) <= hi  # like a decoded image
    assert not (tmp_path / "a.safetensors.shards").exists()  # combined, then removed

    out = tmp_path / "b.safetensors"
    with pytest.raises(Stop):
        synthesize(tiny_digits, prompts, *args, out, chunk=2, on_shard=kill_after(2), **QUIET)
    assert not out.exists()
    shards = sorted(p.name for p in (tmp_path / "b.safetensors.shards").iterdir())
    assert shards == [
        "manifest.json",
        "shard-000000000-000000002.safetensors",
        "shard-000000002-000000004.safetensors",
    ]
    (tmp_path / "b.safetensors.shards" / ".shard-x.safetensors.tmp999999999").write_bytes(b"half")
    seen = count_chunks(monkeypatch)
    logs = []
    resumed = synthesize(tiny_digits, prompts, *args, out, chunk=2, progress=False, log=logs.append)
    assert seen == [2, 2, 1]  # only the missing shards were generated
    assert any("4/9 samples already" in m for m in logs)
    assert torch.equal(resumed.x, full.x) and resumed.prompts == full.prompts
    a, b = load_pool(tmp_path / "a.safetensors"), load_pool(out)  # the file the run reads
    assert torch.equal(a.x, b.x) and a.prompts == b.prompts
    with safe_open(str(out), "pt") as f, safe_open(str(tmp_path / "a.safetensors"), "pt") as g:
        assert torch.equal(f.get_tensor("seeds"), g.get_tensor("seeds"))
        assert f.get_tensor("seeds").tolist() == [sample_seed(7, i) for i in range(9)]
        assert f.metadata() == g.metadata()
        assert json.loads(f.metadata()["prompts"]) == full.prompts
    assert not (tmp_path / "b.safetensors.shards").exists()

    # Already complete: returned without sampling.
    again = synthesize(tiny_digits, prompts, *args, out, chunk=2, **QUIET)
    assert seen == [2, 2, 1] and torch.equal(again.x, full.x)


def test_chunking_does_not_change_the_samples(tiny_digits, tmp_path):
    one = synthesize(
        tiny_digits, ["3", "4"], 3, CFG, 0, tmp_path / "1.safetensors", chunk=6, **QUIET
    )
    many = synthesize(
        tiny_digits, ["3", "4"], 3, CFG, 0, tmp_path / "2.safetensors", chunk=4, **QUIET
    )
    assert torch.allclose(one.x, many.x, atol=1e-5)  # batched kernels may round differently
    # A prefix of the prompts gives the same first samples: noise depends on (seed, i) only.
    pre = synthesize(tiny_digits, ["3"], 3, CFG, 0, tmp_path / "3.safetensors", chunk=6, **QUIET)
    assert torch.allclose(pre.x, one.x[:3], atol=1e-5)
    mem = generate_pool(tiny_digits, ["3", "4"], 3, CFG, seed=0)
    assert torch.allclose(mem.x, one.x, atol=1e-5) and mem.prompts == one.prompts
    other = synthesize(tiny_digits, ["3", "4"], 3, CFG, 1, tmp_path / "4.safetensors", **QUIET)
    assert not torch.allclose(other.x, one.x)


def test_resume_with_another_chunk_and_stale_shards(tiny_digits, tmp_path, monkeypatch):
    out = tmp_path / "s.safetensors"
    with pytest.raises(Stop):
        synthesize(tiny_digits, ["5"], 7, CFG, 3, out, chunk=3, on_shard=kill_after(1), **QUIET)
    seen = count_chunks(monkeypatch)
    pool = synthesize(tiny_digits, ["5"], 7, CFG, 3, out, chunk=2, **QUIET)
    assert seen == [2, 2]  # rows 0..2 kept, 3..6 generated in chunks of 2
    ref = synthesize(tiny_digits, ["5"], 7, CFG, 3, tmp_path / "r.safetensors", chunk=3, **QUIET)
    assert torch.allclose(pool.x, ref.x, atol=1e-5)

    # Shards of a different run (here: another seed) are discarded, never mixed in.
    out2 = tmp_path / "t.safetensors"
    with pytest.raises(Stop):
        synthesize(tiny_digits, ["5"], 4, CFG, 3, out2, chunk=2, on_shard=kill_after(1), **QUIET)
    seen.clear()
    logs = []
    synthesize(tiny_digits, ["5"], 4, CFG, 4, out2, chunk=2, progress=False, log=logs.append)
    assert seen == [2, 2] and any("discarding" in m for m in logs)


def test_any_generator_and_ode_solve(tiny_model, tmp_path):
    pool = synthesize(tiny_model, [""], 5, CFG, 0, tmp_path / "t.safetensors", chunk=2, **QUIET)
    assert pool.x.shape == (5, 2) and pool.prompts == [""] * 5
    assert torch.equal(load_pool(tmp_path / "t.safetensors").x, pool.x)
    noise = torch.randn((4, 2), generator=torch.Generator().manual_seed(5))
    direct = sample_ode(tiny_model, [""] * 4, CFG, torch.Generator().manual_seed(5))
    assert torch.equal(ode_solve(tiny_model, noise, [""] * 4, CFG), direct)


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(DDRLError, match="per_prompt=0"):
        synthesize(tiny_model, [""], 0, CFG, 0, tmp_path / "x.safetensors", **QUIET)
    with pytest.raises(DDRLError, match="is a folder"):
        synthesize(tiny_model, [""], 1, CFG, 0, tmp_path, **QUIET)
    with pytest.raises(DDRLError, match="at least one prompt"):
        synthesize(tiny_model, [], 1, CFG, 0, tmp_path / "x.safetensors", **QUIET)
