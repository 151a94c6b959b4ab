"""Per-group conditional frames (``model.cond_frames``; the release's image-to-video share,
cosmos-rl t2v_model.py L585-589, v2v_model.py L61-72) through the rollout, the policy and data
terms, on the tiny Cosmos pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line_error
from helpers_quick import quick

from ddrl.config import build_config
from ddrl.dist.rng import shared_generator
from ddrl.models.base import CondCache
from ddrl.models.config import ModelConfig
from ddrl.models.cosmos import CosmosGenerator, with_given
from ddrl.models.hf import ensure_tiny
from ddrl.training.components import build_components
from ddrl.training.iteration import collect
from ddrl.training.step import step_batches

MAXLEN = 160


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny(CosmosGenerator, tmp_path_factory.mktemp("cache"), log=lambda m: None)


def test_condition_frames_per_row(tiny):
    """k = 0 leaves a row text-to-video (the same velocity); k = 1 gives its first latent frame:
    v = (x_t − given)/t there, and the other frames as ``with_given`` with that mask."""
    cfg = ModelConfig(name="cosmos", base=str(tiny), max_sequence_length=MAXLEN)
    gen = CosmosGenerator.from_pretrained(tiny, cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, *gen.sample_shape), generator=g)
    x_t = torch.randn((2, *gen.sample_shape), generator=g)
    t = torch.tensor([0.7, 0.4])
    cond = gen.conditioner.encode(["a red ball", "a cat on a mat"])
    got = gen.condition_frames(cond, x0, torch.tensor([0, 1]))
    with torch.no_grad():
        v = gen.denoiser.velocity(x_t, t, got)
        plain = gen.denoiser.velocity(x_t[:1], t[:1], cond.index(torch.tensor([0])))
        mask = torch.zeros(1, 1, x0.shape[2], 1, 1)
        mask[:, :, 0] = 1
        one = cond.index(torch.tensor([1]))
        given = gen.denoiser.velocity(x_t[1:], t[1:], with_given(one, x0[1:], mask))
    torch.testing.assert_close(v[:1], plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[1:], given, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[1, :, 0], (x_t[1, :, 0] - x0[1, :, 0]) / 0.4)
    assert got.batched["given_mask"][:, 0, :, 0, 0].tolist() == [[0, 0], [1, 0]]


def _config(*over):
    return build_config(
        overrides=[
            "preset=tiny-cosmos",
            "train.progress=false",
            f"model.max_sequence_length={MAXLEN}",
            *over,
        ],
    )


def test_groups_share_their_frames_and_the_data_item(tmp_path):
    """Each group: one k ~ U{0, 1} drawn after the plan seed from the shared stream, one data
    item of its prompt, which conditions its rollouts and is the data term's x0; the policy and
    data terms' conditions carry the frames."""
    cfg = _config(f"model.cache_dir={tmp_path}", "model.cond_frames=[0,1]",
                  "train.prompts_per_iter=4")  # fmt: skip
    c = build_components(cfg, log=lambda *a: None)
    P, G, B = 4, cfg.train.group_size, 4 * cfg.train.group_size
    seen = set()
    for it in range(4):
        b = collect(cfg, c, it, slice(0, B), CondCache(c.gen.conditioner), "cpu")
        g = shared_generator(cfg.seed, it)  # the release's per-group draw, by hand
        idx = torch.randint(len(c.data.prompts), (P,), generator=g)
        torch.randint(2**31 - 1, (1,), generator=g)  # the plan seed ("strided": no step draw)
        k = torch.randint(0, 2, (P,), generator=g).repeat_interleave(G)
        assert b.rollout.prompts == [c.data.prompts[i] for i in idx.tolist() for _ in range(G)]
        mask = b.rollout.cond.batched["given_mask"][:, 0, :, 0, 0]
        assert mask[:, 0].tolist() == k.float().tolist() and mask[:, 1:].abs().sum() == 0
        given = b.rollout.cond.batched["given"]
        torch.testing.assert_close(given, b.x0_data)
        for grp in range(P):
            rows = slice(grp * G, (grp + 1) * G)
            assert (b.x0_data[rows] == b.x0_data[rows][:1]).all()  # one item per group
            paired = c.pool.x[c.pool._by_prompt[b.rollout.prompts[grp * G]]]
            assert any(torch.equal(b.x0_data[grp * G], x) for x in paired)
        for sb in step_batches(b, micro=B):
            assert torch.equal(sb.cond.batched["given_mask"], b.rollout.cond.batched["given_mask"])
        seen.update(k.tolist())
    assert seen == {0, 1}


def test_a_run_with_frames_trains(tmp_path):
    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    cfg = _config(f"model.cache_dir={tmp_path}", "model.cond_frames=[1,1]")
    out = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    train(cfg, out, log=lambda *a: None)
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["loss_data"] > 0 for r in rows)


def test_bad_frames_are_one_line_errors(tmp_path):
    one_line_error(build_config, overrides=["model.cond_frames=[2,1]"],
                   match=("model.cond_frames", "min <= max"))  # fmt: skip
    one_line_error(build_config, overrides=quick("model.cond_frames=[0,1]"),
                   match=("model.cond_frames", "digits"))  # fmt: skip
    cfg = _config(f"model.cache_dir={tmp_path}", "model.cond_frames=[0,2]")
    one_line_error(build_components, cfg, log=lambda *a: None, match=("at most 1", "2 latent"))


def test_image_to_video_evaluation(tmp_path):
    """eval.cond_frames: each prompt's samples start from one data item of that prompt (drawn
    from the eval seed + 1), and their given latent frame ends exactly on the item's."""
    from ddrl.evaluation.evaluate import evaluate_components
    from ddrl.sampling import sample_ode

    cfg = _config(f"model.cache_dir={tmp_path}", "eval.cond_frames=1")
    c = build_components(cfg, log=lambda *a: None, training=False)
    assert c.pool is not None and not c.needs_data  # built for the frames alone
    m, raw, prompts = evaluate_components(c.gen, c, cfg)
    eval_prompts = c.data.eval_prompts or c.data.prompts
    n = cfg.eval.samples_per_prompt
    items = [c.pool.x[c.pool._by_prompt[p]] for p in eval_prompts]
    g = torch.Generator().manual_seed(cfg.eval.seed + 1)  # one item per prompt, by hand
    x = torch.stack([ix[torch.randint(len(ix), (1,), generator=g)][0] for ix in items])
    x = x.repeat_interleave(n, dim=0)
    z = sample_ode(c.gen, prompts, cfg.eval.sampler(cfg.sampler),
                   torch.Generator().manual_seed(cfg.eval.seed),
                   given=(x, torch.ones(len(prompts), dtype=torch.long)))  # fmt: skip
    assert (z[:, :, 0] - x[:, :, 0]).abs().max() < 1e-5
    torch.testing.assert_close(raw, c.gen.codec.decode(z))
    assert torch.isfinite(torch.tensor(m["proxy_reward"]))
