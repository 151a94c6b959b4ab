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


def qwen_tokenizer(model_max_length: int = 32768):
    """A Qwen2TokenizerFast: specials "<|endoftext|>" (0, also padding), "<|im_start|>" (1),
    "<|im_end|>" (2, eos), then the 256 byte characters of byte-level BPE (259 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
