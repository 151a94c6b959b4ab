"""Several rewards at once: both aggregation modes against hand-computed advantages, per-reward
logging, image rewards on videos, and the config's one-line errors."""

import math

import pytest
import torch

from ddrl.advantages import combine_advantages
from ddrl.config import build_config
from ddrl.config.core import AdvantageConfig
from ddrl.errors import DDRLError
from ddrl.rewards.multi import MultiReward


def _norm(xs):
    """(x − mean)/(unbiased std + 1e-4) by hand."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - m) / (sd + 1e-4) for x in xs]


R1 = [1.0, 2.0, 4.0, 0.0, 0.0, 3.0]  # two groups of three
R2 = [10.0, 0.0, 5.0, 1.0, 2.0, 3.0]
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])
W = [1.0, 0.5]


def test_flow_grpo_mode_normalises_the_weighted_sum():
    r = torch.tensor([R1, R2]).T
    adv, valid = combine_advantages(r, torch.tensor(W), GROUPS, AdvantageConfig(), "flow_grpo")
    s = [a * W[0] + b * W[1] for a, b in zip(R1, R2, strict=True)]
    want = _norm(s[:3]) + _norm(s[3:])
    assert valid.all() and torch.allclose(adv, torch.tensor(want), atol=1e-6)


def test_cosmos_rl_mode_averages_each_rewards_advantage_then_clamps():
    r = torch.tensor([R1, R2]).T
    cfg = AdvantageConfig(clamp=1.1)
    adv, _ = combine_advantages(r, torch.tensor(W), GROUPS, cfg, "cosmos_rl")
    a1, a2 = _norm(R1[:3]) + _norm(R1[3:]), _norm(R2[:3]) + _norm(R2[3:])
    want = [
        max(-1.1, min(1.1, (W[0] * x + W[1] * y) / sum(W))) for x, y in zip(a1, a2, strict=True)
    ]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    # the two modes really differ
    other, _ = combine_advantages(r, torch.tensor(W), GROUPS, cfg, "flow_grpo")
    assert (other - adv).abs().max() > 0.05


def test_cosmos_rl_mode_applies_the_exp_transform_after_the_average():
    r = torch.tensor([R1, R2]).T
    cfg = AdvantageConfig(exp_transform=True)
    adv, _ = combine_advantages(r, torch.tensor([1.0, 1.0]), GROUPS, cfg, "cosmos_rl")
    a1, a2 = _norm(R1[:3]) + _norm(R1[3:]), _norm(R2[:3]) + _norm(R2[3:])
    want = [-math.exp(-max((x + y) / 2, -math.log(5))) for x, y in zip(a1, a2, strict=True)]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)


def test_a_non_finite_value_of_any_reward_skips_its_group():
    r = torch.tensor([R1, R2]).T.clone()
    r[4, 1] = float("nan")
    for how in ("flow_grpo", "cosmos_rl"):
        adv, valid = combine_advantages(r, torch.tensor(W), GROUPS, AdvantageConfig(), how)
        assert valid.tolist() == [True] * 3 + [False] * 3 and (adv[3:] == 0).all()


def test_image_rewards_score_videos_frame_by_frame():
    seen = []

    def mean_pixel(images, prompts):
        seen.append(images.shape)
        return images.flatten(1).mean(1)

    videos = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2) / 100
    multi = MultiReward(["m"], [mean_pixel], [1.0])
    got = multi.each(videos, ["a", "b"])[:, 0]
    want = torch.stack([videos[:, :, f].flatten(1).mean(1) for f in range(4)], 1).mean(1)
    assert seen[-1] == (8, 3, 2, 2) and torch.allclose(got, want)
    first_last = MultiReward(["m"], [mean_pixel], [1.0], frames="0,-1").each(videos, ["a", "b"])
    want = (videos[:, :, 0].flatten(1).mean(1) + videos[:, :, -1].flatten(1).mean(1)) / 2
    assert torch.allclose(first_last[:, 0], want)


def test_two_rewards_train_and_each_is_logged(tmp_path):
    from helpers_quick import quick

    from ddrl.training.loop import train
    from ddrl.training.runlog import prepare_run_dir, read_jsonl

    ov = quick("reward.name=ink,classifier", "reward.weights=1,2", "reward.aggregate=cosmos_rl")
    cfg = build_config(overrides=ov)
    out = prepare_run_dir(tmp_path / "r", resume=False, overwrite=False)
    train(cfg, out, log=lambda *a: None)
    row = read_jsonl(out / "metrics.jsonl")[-1]
    ink, clf = row["reward_ink_mean"], row["reward_classifier_mean"]
    assert row["reward_mean"] == pytest.approx(ink + 2 * clf, rel=1e-5)


@pytest.mark.parametrize(
    "override, says",
    [
        ("reward.weights=1,2", "need 1 non-negative"),
        ("reward.weights=a", "comma-separated numbers"),
        ("reward.aggregate=mean", "reward.aggregate"),
        ("reward.name=ink,nope", "nope"),
        ("reward.frames=first", "reward.frames"),
    ],
)
def test_bad_multi_reward_settings_are_one_line(override, says):
    with pytest.raises(DDRLError, match=says) as e:
        build_config(overrides=[override])
    assert "\n" not in str(e.value)


def test_a_whole_video_reward_gets_the_videos_unsplit():
    seen = []

    class WholeVideo:
        accepts_video = True

        def __call__(self, videos, prompts):
            seen.append(videos.shape)
            return videos.flatten(1).mean(1)

    videos = torch.rand(2, 3, 5, 4, 4)
    got = MultiReward(["v"], [WholeVideo()], [1.0]).each(videos, ["a", "b"])[:, 0]
    assert seen == [(2, 3, 5, 4, 4)] and torch.allclose(got, videos.flatten(1).mean(1))


def test_reward_clip_clamps_raw_rewards_before_the_scale(tmp_path):
    """reward.clip = c: r ← min(max(r, −c), c), then × reward.scale (the DDRL release's order:
    reward_models.py L224-227); NaN passes through, so its group is still skipped. The loop's
    logged reward mean is the mean of the clamped, scaled rewards (checked against a run
    without the clamp: the clamped run's mean is the hand-clamped one's)."""
    from conftest import run_quick

    from ddrl.rewards.multi import clip_rewards

    raw = torch.tensor([[-12.0, 0.5], [4.9, 7.0], [float("nan"), -5.0]])
    by_hand = [[max(min(v, 5.0), -5.0) if v == v else v for v in row] for row in raw.tolist()]
    got = clip_rewards(raw, 5.0).tolist()
    for g_row, h_row in zip(got, by_hand, strict=True):
        for g, h in zip(g_row, h_row, strict=True):
            assert (math.isnan(g) and math.isnan(h)) or g == h
    assert torch.equal(clip_rewards(raw[1:2], 0.0), raw[1:2])  # 0 = off
    name = "reward.name=plugins_for_tests:spread_ink"
    _, _, free = run_quick(tmp_path, "free", name, "train.iterations=1")
    _, _, clipped = run_quick(
        tmp_path, "clipped", name, "reward.clip=1", "reward.scale=2", "train.iterations=1"
    )
    # the ink reward of a 30-step base is ~0.3·50 = 15 > 1 everywhere: every sample clamps to 1
    assert free["reward_mean"] > 5 and clipped["reward_mean"] == pytest.approx(2.0)
    assert clipped["reward_std"] == pytest.approx(0.0, abs=1e-6)
