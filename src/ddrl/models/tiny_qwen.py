"""A tiny Qwen2 tokenizer built offline (no downloads) for the tiny Cosmos-Predict2.5 pipeline.

Cosmos-Predict2.5 encodes prompts with Qwen2.5-VL through the tokenizer's chat template
(``Cosmos2_5_PredictBasePipeline._get_prompt_embeds``: a system and a user message, each a list
of ``{"type": "text", "text": ...}`` parts, padded to ``max_length``). This builds the same kind
of tokenizer small: a byte-level BPE from the ``tokenizers`` library with no merges (every byte
is one token, so any text tokenises), wrapped in transformers' ``Qwen2TokenizerFast`` with
Qwen's special tokens and a ChatML template, so the pipeline's ``save_pretrained`` /
``from_pretrained`` round-trip it like the real one.
"""

from __future__ import annotations

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2 (Qwen: 151643, 151644, 151645)

# ChatML as Qwen2.5-VL writes it, text parts only (no default system message, no vision ids).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_bpe(specials: tuple[str, ...]):
    """A ``tokenizers`` byte-level BPE with no merges: ``specials`` (ids 0..k−1), then the 256
    byte characters, each one token, so any text tokenises."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


def qwen_tokenizer(model_max_length: int = 32768):
    """A Qwen2TokenizerFast: specials "<|endoftext|>" (0, also padding), "<|im_start|>" (1),
    "<|im_end|>" (2, eos), then the 256 byte characters of byte-level BPE (259 tokens)."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(
        tokenizer_object=byte_level_bpe(SPECIALS),
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def tiny_qwen25_vl(tok, hidden: int, layers: int, vision: dict | None = None):
    """A tiny Qwen2_5_VLForConditionalGeneration for ``tok`` (``qwen_tokenizer``): ``layers``
    text layers of width ``hidden`` (2 heads, 1 KV head, FFN 32, Qwen2.5-VL's 3-section mrope)
    and a 1-block vision tower projecting to ``hidden``. ``vision``: the vision specials' token
    ids (``*_token_id``) and the tower's ``patch_size`` / ``window_size`` (the edit pipelines)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = vision or {}
    ids = {k: v for k, v in vision.items() if k.endswith("_token_id")}
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tok),
                hidden_size=hidden,
                intermediate_size=32,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]},
                bos_token_id=None,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=16,
                num_heads=2,
                out_hidden_size=hidden,
                fullatt_block_indexes=[0],
                patch_size=vision.get("patch_size", 14),
                window_size=vision.get("window_size", 112),
            ),
            **ids,
        )
    )
