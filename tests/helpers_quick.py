"""Shared quick settings for the integration tests (a tiny base, tiny batches)."""

QUICK = [
    "pretrain.steps=30",
    "pretrain.batch_size=32",
    "train.iterations=2",
    "train.prompts_per_iter=2",
    "train.group_size=4",
    "sampler.num_steps=4",
    "sampler.eval_steps=4",
    "eval.samples_per_prompt=3",
    "train.progress=false",
]


def quick(*extra: str) -> list[str]:
    return QUICK + list(extra)
