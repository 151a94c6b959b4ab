"""One condition image per prompt (``data.condition_images``): the source image of an edit
model's instruction (Qwen-Image-Edit), the first frame of an image-to-video model (Cosmos).

The set is read like ``data.images`` (a caption folder or a .jsonl/.csv/.parquet table); each
caption is a prompt and its image is that prompt's condition. The conditioner receives the
mapping once (``Conditioner.set_images``, before ``prepare``) and folds the image into the
prompt's cached condition rows, so rollout, policy term, data term and evaluation all see it
through the same ``Cond`` and nothing else in the loop changes. Images are read when a prompt
is first encoded, not all at once (an edit set may hold thousands of large images).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor

from ddrl.data.files import Item, list_items
from ddrl.errors import DDRLError


class ConditionImages(Mapping):
    """prompt → condition image [3, H, W] in [-1, 1] at the model's pixel size, read on first
    access (and not kept: the conditioner keeps what it derives from it)."""

    def __init__(self, path: str, size: tuple[int, int]):
        self.path, self.size = path, size
        self.items: dict[str, Item] = {}
        for item in list_items(path):
            if item.caption in self.items:
                raise DDRLError(
                    f"data.condition_images={path!r}: prompt {item.caption!r} has two images "
                    f"({self.items[item.caption].name}, {item.name}); allowed: one image per "
                    "prompt (make repeated instructions distinct, e.g. name the object)"[:400]
                )
            if item.kind != "image":
                raise DDRLError(f"data.condition_images: {item.name} is a video; allowed: images")
            self.items[item.caption] = item

    def __getitem__(self, prompt: str) -> Tensor:
        from ddrl.data.media import load_media

        if prompt not in self.items:
            raise DDRLError(
                f"prompt {prompt!r} has no condition image in data.condition_images="
                f"{self.path!r}; allowed: prompts that are captions of that set"[:400]
            )
        return load_media(self.items[prompt], self.size)

    def __contains__(self, prompt) -> bool:
        return prompt in self.items

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def attach_condition_images(gen, path: str, prompts: list[str], family: str) -> None:
    """Give ``gen``'s conditioner the condition images of ``path`` (``data.condition_images``),
    after checking that the family takes them and that every prompt in ``prompts`` has one."""
    setter = getattr(gen.conditioner, "set_images", None)
    if not callable(setter):
        raise DDRLError(
            f"data.condition_images is set but model.name={family!r} takes no condition "
            "image; allowed: qwen_image_edit, cosmos (image-to-video), or leave it empty"
        )
    images = ConditionImages(path, (gen.height, gen.width))
    missing = [p for p in dict.fromkeys(prompts) if p not in images]
    if missing:
        raise DDRLError(
            f"data.condition_images={path!r} has no image for {len(missing)} prompt(s), e.g. "
            f"{missing[0]!r}; allowed: a set whose captions cover every prompt"[:400]
        )
    setter(images)
