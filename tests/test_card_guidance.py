"""The exported model card's snippet guides each family's pipeline as ddrl's cfg_scale = w did
(the mapping each family's pipeline-equivalence test checks: tests/test_<family>.py)."""

import pytest

from ddrl.cli.card import diffusers_usage
from ddrl.config.core import SamplerConfig
from ddrl.data.config import cache_root
from ddrl.models import resolve
from ddrl.models.config import ModelConfig
from ddrl.models.hf import ensure_tiny


@pytest.mark.parametrize(
    "family, variant, w, extra, says",
    [
        ("qwen_image", "", 4.0, {}, ["true_cfg_scale=4.0", 'negative_prompt=" "']),
        ("qwen_image", "", 1.0, {}, []),  # no negative prompt: the pipeline does no CFG
        ("qwen_image_edit", "", 4.0, {}, ["true_cfg_scale=4.0", 'image=Image.open("input.png")']),
        ("z_image", "", 5.0, {}, ["guidance_scale=4.0"]),  # pos + g·(pos − neg): g = w − 1
        ("z_image", "", 1.0, {}, ["guidance_scale=0.0"]),
        ("flux2_klein", "", 4.0, {}, ["guidance_scale=4.0"]),  # true CFG as ddrl's
        ("flux2", "", 1.0, {}, ["guidance_scale=4.0"]),  # FLUX.2-dev's guidance embedding
        ("cosmos", "", 8.0, {}, ["guidance_scale=7.0"]),
        ("wan", "a14b", 4.0, {"cfg_scale_2": 3.0}, ["guidance_scale=4.0", "guidance_scale_2=3.0"]),
        ("sd3", "", 4.5, {}, ["guidance_scale=4.5"]),
    ],
)
def test_card_snippet_guidance(family, variant, w, extra, says, tmp_path):
    cls = resolve(family)
    folder = ensure_tiny(cls, cache_root(), log=lambda m: None, variant=variant)
    gen = cls.from_pretrained(folder, ModelConfig(name=family, base=str(folder), **extra))
    _, code = diffusers_usage(gen, tmp_path, True, SamplerConfig(cfg_scale=w, eval_steps=4))
    call = code[code.index("out = pipe(") :]
    for s in says:
        assert s in code, (s, call)
    if not says:
        assert "cfg_scale" not in call and "negative_prompt" not in call
