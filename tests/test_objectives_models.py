"""The forward-process objectives on the four diffusers families (tiny pipelines built from
config, no download): each trains with LoRA or full fine-tuning, with and without the data
term, and its lagging weights are the trainable ones (LoRA adapters or every weight)."""

import pytest
import torch

from ddrl.config import build_config
from ddrl.dist.checkpoint import latest_checkpoint, load_checkpoint
from ddrl.training.loop import train
from ddrl.training.runlog import prepare_run_dir


@pytest.mark.parametrize(
    "preset, algorithm, finetune",
    [
        ("tiny-sd3", "nft", "lora"),  # CFG 4.5 at rollout, conditional training, LoRA reference
        ("tiny-flux", "awm", "full"),  # frozen-copy reference, guidance embedding
        ("tiny-wan", "nft_data", "lora"),  # video latents, synthetic data term
        ("tiny-cosmos", "awm_data", "full"),  # per-frame timesteps, the release's data options
    ],
)
def test_new_objectives_train_every_diffusers_family(tmp_path, preset, algorithm, finetune):
    ov = [f"preset={preset}", f"algorithm={algorithm}", f"model.finetune={finetune}",
          "train.iterations=2", "train.timestep_count=1", "train.progress=false",
          "loss.old_rate=0.3" if algorithm.startswith("nft") else "loss.lag_rate=0.3"]  # fmt: skip
    cfg = build_config(overrides=ov)
    out = prepare_run_dir(tmp_path / preset, resume=False, overwrite=False)
    row = train(cfg, out, log=lambda *a, **k: None)
    terms = {k for k in row if k.startswith("loss_")}
    assert "loss_policy" in terms and all(row[k] == row[k] for k in terms), row
    assert ("loss_data" in terms) == algorithm.endswith("_data")
    assert row["grad_norm"] > 0
    _, parts = load_checkpoint(latest_checkpoint(out))
    assert parts["loss"].keys() == {f"{i}.{k}" for k in parts["model"] for i in [_lag_part(cfg)]}
    if finetune == "lora":
        assert all("lora" in k for k in parts["model"])
    moved = [not torch.equal(parts["loss"][f"{_lag_part(cfg)}.{k}"], v)
             for k, v in parts["model"].items()]  # fmt: skip
    assert any(moved)  # the lagging copy trails the trained weights (d > 0 after step 1)


def _lag_part(cfg) -> int:
    """The index of the part holding lagging weights: NFT's objective (0), AWM's lagging_kl."""
    if cfg.objective == "nft":
        return 0
    return 1 + cfg.regularisers.split(",").index("lagging_kl")
