"""Config resolution: defaults → presets → files → overrides, type coercion, one-line errors."""

import dataclasses
import json

import pytest
from named_losses import DDRLConfig, FlowGRPOConfig, PolicyConfig, SFTConfig

from ddrl.config import RunConfig, build_config, load_config, save_config
from ddrl.config.core import AdvantageConfig, DanceSDE, FlowSDE
from ddrl.config.resolve import parse_overrides
from ddrl.errors import DDRLError


def test_defaults_resolve():
    cfg = build_config()
    assert cfg.preset == "digits" and cfg.algorithm == "ddrl" and cfg.seed == 0
    # the digits preset
    assert cfg.model.name == "digits" and cfg.data.name == "digits"
    assert cfg.reward.name == "ink" and cfg.gold.name == "digits"
    assert cfg.model.base == "" and cfg.model.resolution == 0 and cfg.data.source == "real"
    # the ddrl preset: Flow-SDE on the scheduler grid, the data term at the rollout's t
    assert cfg.sampler.sde == FlowSDE(noise_level=0.7) and cfg.sampler.grid == "scheduler"
    assert type(cfg.loss) is DDRLConfig
    assert cfg.loss.data_beta == 0.1 and cfg.loss.data_t == "rollout"
    assert cfg.loss.clip_range == 1e-4 and not hasattr(cfg.loss, "reward_weight")
    assert cfg.advantage == AdvantageConfig(std="unbiased")
    assert cfg.train.timestep_selection == "first" and cfg.train.skip_last_step is False
    assert cfg.optim.betas == (0.9, 0.99)
    assert not hasattr(cfg, "task") and not hasattr(cfg.eval, "clamp_low")


def test_dance_grpo_preset():
    cfg = build_config(overrides=["algorithm=dance_grpo"])
    assert cfg.sampler.sde == DanceSDE(eta=0.3) and cfg.sampler.grid == "linear"
    assert cfg.sampler.shared_noise is True
    assert cfg.train.timestep_fraction == 0.6 and cfg.train.timestep_selection == "per_sample"
    assert cfg.train.skip_last_step is True  # DanceGRPO permutes steps 0..N−2
    assert cfg.advantage.std == "unbiased" and cfg.advantage.eps == 1e-8
    assert type(cfg.loss) is PolicyConfig


def test_sft_flow_grpo_grpo_and_toy_presets():
    sft = build_config(overrides=["algorithm=sft"])
    assert type(sft.loss) is type(SFTConfig()) and sft.loss.data_beta == 1.0
    fg = build_config(overrides=["algorithm=flow_grpo"])
    assert type(fg.loss) is FlowGRPOConfig
    assert fg.loss.beta_kl == 0.04 and fg.loss.reference == "auto"
    assert fg.sampler.sde == FlowSDE(noise_level=0.7) and fg.sampler.grid == "scheduler"
    assert fg.advantage.std == "global"  # flow_grpo's shipped configs: global_std = True
    assert fg.train.timestep_fraction == 0.99 and fg.train.timestep_selection == "first"
    grpo = build_config(overrides=["algorithm=grpo"])
    assert type(grpo.loss) is PolicyConfig and grpo.sampler.sde == FlowSDE()
    toy = build_config(overrides=["preset=toy2d"])
    assert toy.model.name == "toy2d" and toy.data.name == "toy2d" and toy.gold.name == "toy2d"
    assert toy.reward.name == "right" and toy.train.group_size == 16
    assert toy.pretrain.steps == 1500 and toy.eval.samples_per_prompt == 200
    assert toy.algorithm == "ddrl" and toy.sampler.sde == FlowSDE()


def test_overrides_beat_presets_and_files_pick_presets(tmp_path):
    cfg = build_config(overrides=["algorithm=dance_grpo", "train.timestep_fraction=0.9"])
    assert cfg.train.timestep_fraction == 0.9 and cfg.sampler.sde.kind == "dance"
    cfg = build_config(overrides=["algorithm=dance_grpo", "sampler.sde.eta=0.25"])
    assert cfg.sampler.sde == DanceSDE(eta=0.25)
    f = tmp_path / "run.toml"
    f.write_text('algorithm = "dance_grpo"\npreset = "toy2d"\n[train]\niterations = 3\n')
    cfg = build_config(files=[str(f)], overrides=["train.iterations=4"])
    assert cfg.sampler.shared_noise is True  # the file's algorithm chose the preset
    assert cfg.reward.name == "right"  # and its preset
    assert cfg.train.iterations == 4  # the override came last


def test_sde_section_is_typed_by_its_kind():
    # another kind than the algorithm preset's: its sampler.sde.* keys do not apply, the rest do.
    cfg = build_config(overrides=["algorithm=dance_grpo", "sampler.sde.kind=flow"])
    assert cfg.sampler.sde == FlowSDE(noise_level=0.7)
    assert cfg.sampler.shared_noise is True and cfg.sampler.grid == "linear"
    cfg = build_config(overrides=["sampler.sde.kind=dance", "sampler.sde.eta=0.5"])
    assert cfg.sampler.sde == DanceSDE(eta=0.5)
    msg = _one_line_error(overrides=["sampler.sde.kind=dance", "sampler.sde.noise_level=0.5"])
    assert "'sampler.sde.noise_level'" in msg and "eta" in msg


def test_loss_section_is_typed_by_the_algorithm():
    cfg = build_config(overrides=["algorithm=flow_grpo", "loss.beta_kl=0.01"])
    assert cfg.loss.beta_kl == 0.01
    msg = _one_line_error(overrides=["loss.beta_kl=0.01"])  # algorithm=ddrl
    assert "'loss.beta_kl'" in msg and "'ddrl'" in msg and "data_beta" in msg
    msg = _one_line_error(overrides=["algorithm=sft", "loss.clip_range=0.1"])
    assert "'loss.clip_range'" in msg and "'sft'" in msg
    msg = _one_line_error(overrides=["algorithm=grpo", "loss.data_beta=0.1"])
    assert "'loss.data_beta'" in msg and "'grpo'" in msg and "clip_range" in msg


def test_overrides_coerce_types():
    cfg = build_config(
        overrides=[
            "train.iterations=7",
            "optim.betas=0.8,0.9",
            "sampler.shared_noise=true",
            "optim.lr=1",
            "train.progress=off",
            "sampler.sde.kind=dance",
            "sampler.sde.eta=1",
            "train.skip_last_step=yes",
            "advantage.std=global",
        ]
    )
    assert cfg.train.iterations == 7 and type(cfg.train.iterations) is int
    assert cfg.optim.betas == (0.8, 0.9) and type(cfg.optim.betas) is tuple
    assert cfg.sampler.shared_noise is True
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.train.progress is False and cfg.train.skip_last_step is True
    assert cfg.sampler.sde == DanceSDE(eta=1.0) and type(cfg.sampler.sde.eta) is float
    assert cfg.advantage.std == "global"


def test_parse_overrides_splits_on_first_equals():
    assert parse_overrides(["a.b = x=y", "c=1"]) == {"a.b": "x=y", "c": "1"}


BAD_OVERRIDES = [
    (["algorithm=foo"], ["'foo'", "allowed", "ddrl", "dance_grpo", "sft"]),
    (["train.iteratons=3"], ["'train.iteratons'", "allowed", "iterations"]),
    (["sampler.sdee=flow"], ["'sampler.sdee'", "allowed", "sde", "grid"]),
    (["foo.bar=1"], ["'foo'", "allowed", "train", "sampler"]),
    (["train=3"], ["'train'", "section", "train.iterations"]),
    (["sampler.sde=dance"], ["'sampler.sde'", "section", "sampler.sde.kind"]),
    (["seed.x=1"], ["'seed'", "not a section"]),
    (["train.iterations=abc"], ["train.iterations", "'abc'", "int"]),
    (["train.iterations=1.5"], ["train.iterations", "'1.5'", "int"]),
    (["optim.lr=abc"], ["optim.lr", "'abc'", "float"]),
    (["sampler.shared_noise=maybe"], ["'maybe'", "allowed: true, false"]),
    (["optim.betas=0.8"], ["optim.betas", "'0.8'", "2"]),
    (["train.group_size=1"], ["train.group_size=1", "allowed", "[2, inf]"]),
    (["optim.lr=-1"], ["optim.lr=-1.0", "allowed", "(0, 1]"]),
    (["sampler.sde.kind=bogus"], ["'bogus'", "allowed", "dance", "flow"]),
    (["sampler.sde.noise_level=0"], ["sampler.sde.noise_level=0.0", "allowed"]),
    (["sampler.grid=cosine"], ["'cosine'", "allowed", "linear", "scheduler"]),
    (["loss.data_t=x"], ["'x'", "allowed", "random", "rollout"]),
    (["loss.beta_kl=0.1"], ["'loss.beta_kl'", "algorithm 'ddrl'", "data_beta"]),
    (["preset=cats"], ["'cats'", "allowed", "digits", "toy2d"]),
    (["task=toy2d"], ["'task'", "allowed", "preset"]),
    (["model.name=nope"], ["'nope'", "allowed", "digits", "toy2d"]),
    (["data.source=web"], ["'web'", "allowed", "real", "synthetic"]),
    (["advantage.std=sample"], ["'sample'", "allowed", "global", "population", "unbiased"]),
    (["advantage.eps=0"], ["advantage.eps=0.0", "allowed"]),
    (["train.timestep_selection=random"], ["'random'", "allowed", "per_sample", "strided"]),
    (["train.max_bad_steps=0"], ["train.max_bad_steps=0", "allowed", "[1, inf]"]),
    (["eval.clamp_low=0"], ["'eval.clamp_low'", "allowed", "samples_per_prompt"]),
    (["trainiterations"], ["'trainiterations'", "key=value"]),
]


def _one_line_error(**kw) -> str:
    with pytest.raises(DDRLError) as e:
        build_config(**kw)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    assert "Traceback" not in msg
    return msg


@pytest.mark.parametrize("overrides, needles", BAD_OVERRIDES)
def test_bad_override_is_one_line_error(overrides, needles):
    msg = _one_line_error(overrides=overrides)
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.toml"
    msg = _one_line_error(files=[str(path)])
    assert str(path) in msg and "does not exist" in msg


def test_unparsable_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train\niterations = 3\n")
    msg = _one_line_error(files=[str(path)])
    assert str(path) in msg and "cannot parse" in msg and "line 1" in msg


def test_toml_with_typo_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[train]\niteratons = 3\n")
    msg = _one_line_error(files=[str(path)])
    assert "'train.iteratons'" in msg and "iterations" in msg


def test_toml_with_wrong_type(tmp_path):
    path = tmp_path / "type.toml"
    path.write_text("[train]\niterations = 2.5\n")
    msg = _one_line_error(files=[str(path)])
    assert "train.iterations=2.5" in msg and "int" in msg


def test_toml_loss_key_of_another_algorithm(tmp_path):
    path = tmp_path / "loss.toml"
    path.write_text('algorithm = "dance_grpo"\n[loss]\nbeta_kl = 0.04\n')
    msg = _one_line_error(files=[str(path)])
    assert "'loss.beta_kl'" in msg and "'dance_grpo'" in msg


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=dance_grpo", "preset=toy2d", "optim.betas=0.8,0.95", "seed=3"],
        ["algorithm=flow_grpo", "loss.beta_kl=0.01", "advantage.std=population"],
    ],
)
def test_save_load_round_trip(tmp_path, overrides):
    cfg = build_config(overrides=overrides)
    path = tmp_path / "config.json"
    save_config(cfg, path)
    back = load_config(path)
    assert isinstance(back, RunConfig)
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert type(back.loss) is type(cfg.loss) and type(back.sampler.sde) is type(cfg.sampler.sde)
    # a default config differs, so the comparison above is not vacuous.
    assert dataclasses.asdict(RunConfig()) != dataclasses.asdict(cfg)


def test_round_trip_values(tmp_path):
    cfg = build_config(
        overrides=["algorithm=dance_grpo", "preset=toy2d", "optim.betas=0.8,0.95", "seed=3"]
    )
    path = tmp_path / "config.json"
    save_config(cfg, path)
    back = load_config(path)
    assert back.optim.betas == (0.8, 0.95) and back.seed == 3
    assert back.sampler.sde == DanceSDE(eta=0.3) and back.preset == "toy2d"
    assert back.model.name == "toy2d" and back.train.timestep_selection == "per_sample"


def test_load_config_does_not_reapply_presets(tmp_path):
    path = tmp_path / "config.json"
    save_config(build_config(overrides=["preset=toy2d", "algorithm=dance_grpo"]), path)
    data = json.loads(path.read_text())
    # values a preset would set if re-applied: the saved file wins.
    data["train"]["group_size"] = 5  # toy2d preset: 16
    data["sampler"]["shared_noise"] = False  # dance_grpo preset: true
    data["sampler"]["sde"]["eta"] = 0.4  # dance_grpo preset: 0.3
    path.write_text(json.dumps(data))
    back = load_config(path)
    assert back.train.group_size == 5 and back.sampler.shared_noise is False
    assert back.sampler.sde == DanceSDE(eta=0.4)


def test_load_config_overrides_limited_to_allowed(tmp_path):
    path = tmp_path / "config.json"
    save_config(build_config(), path)
    cfg = load_config(path, ["eval.samples_per_prompt=5"], allowed=("eval.",), context="eval")
    assert cfg.eval.samples_per_prompt == 5
    with pytest.raises(DDRLError, match="eval may only change eval.; got \\['train.iterations'\\]"):
        load_config(path, ["train.iterations=3"], allowed=("eval.",), context="eval")
    with pytest.raises(DDRLError, match="may only change nothing"):
        load_config(path, ["seed=1"])


def test_load_config_checks_values(tmp_path):
    path = tmp_path / "config.json"
    save_config(build_config(), path)
    path.write_text(path.read_text().replace('"group_size": 8', '"group_size": 1'))
    with pytest.raises(DDRLError, match="train.group_size=1"):
        load_config(path)
