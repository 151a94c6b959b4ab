"""Tiny offline text encoders and tokenizers for the tiny FLUX.2 / FLUX.2-Klein pipelines
(``ddrl.models.flux2``): no downloads. Each encoder is deep enough for its pipeline's
hidden-state layers (FLUX.2-dev reads Mistral-3 layers 10, 20, 30; Klein reads Qwen3 layers
9, 18, 27), with one layer more so that the last one read is not the final-normed output, as in
the real 40-layer Mistral-Small and 36-layer Qwen3."""

from __future__ import annotations


def tiny_mistral3(width: int):
    """(Mistral3ForConditionalGeneration of text width ``width`` and 31 layers, tokenizer)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = mistral_tokenizer()
    text = {"model_type": "mistral", "vocab_size": len(tok), "hidden_size": width,
            "intermediate_size": 2 * width, "num_hidden_layers": 31, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": width // 2, "max_position_embeddings": 1024,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": tok.pad_token_id}  # fmt: skip
    vision = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "image_size": 32,
              "patch_size": 8, "head_dim": 8}  # fmt: skip
    conf = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1,
    )
    return Mistral3ForConditionalGeneration(conf), tok


def tiny_qwen3(width: int):
    """(Qwen3ForCausalLM of width ``width`` and 28 layers, tokenizer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen3_tokenizer()
    conf = Qwen3Config(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
        head_dim=width // 2, max_position_embeddings=1024, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen3ForCausalLM(conf), tok


MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>",
                    "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")  # fmt: skip
# Mistral-Small-3.x's chat format, text parts only: BOS, [SYSTEM_PROMPT]…[/SYSTEM_PROMPT],
# [INST]…[/INST], assistant text + EOS.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{% else %}{{ text + eos_token }}{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """A byte-level tokenizer with Mistral-3's special tokens and chat format (the real
    pipeline's tokenizer is a PixtralProcessor, which needs torchvision; the pipeline only calls
    its ``apply_chat_template``, which a tokenizer has with the same arguments)."""
    from transformers import PreTrainedTokenizerFast

    from ddrl.models.tiny_qwen import byte_level_bpe

    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(MISTRAL_SPECIALS),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=MISTRAL_TEMPLATE,
        model_max_length=131072,
    )


def qwen3_tokenizer():
    """``ddrl.models.tiny_qwen.qwen_tokenizer`` with Qwen3's thinking tokens and template tail:
    ``enable_thinking=False`` (what Flux2KleinPipeline passes) appends an empty think block
    after the generation prompt, as Qwen3's own template does."""
    from ddrl.models.tiny_qwen import CHAT_TEMPLATE, qwen_tokenizer

    tok = qwen_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    tail = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert CHAT_TEMPLATE.endswith(tail)
    tok.chat_template = CHAT_TEMPLATE[: -len(tail)] + (
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
    )
    return tok
