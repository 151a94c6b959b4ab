"""Tiny tokenizers built offline (no downloads) for the tiny diffusers pipelines.

The tokenizers are character-level: every input character is its own token, so any text tokenises
without crashing and the vocabularies stay a few hundred entries. They are the real
transformers classes (``CLIPTokenizer``, ``T5TokenizerFast``), so a pipeline's
``save_pretrained`` / ``from_pretrained`` round-trips them like the full-size ones. The
tiny text-encoder configs sized for them are here too.
"""

from __future__ import annotations

import string

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2's ``bytes_to_unicode``)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def clip_tokenizer(model_max_length: int = 77):
    """A CLIP BPE tokenizer over single bytes (no merges): a word "cat" → "c", "a", "t</w>".

    Vocabulary: bos "<|startoftext|>" (0), eos = pad = unk "<|endoftext|>" (1), then every byte
    character alone and with the "</w>" word-end suffix (514 entries)."""
    from transformers import CLIPTokenizer

    vocab = {CLIP_BOS: 0, CLIP_EOS: 1}
    for c in _byte_chars():
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


def t5_tokenizer(model_max_length: int = 512):
    """A T5 Unigram tokenizer (Metaspace pre-tokenizer) over printable ASCII characters.

    Vocabulary: "<pad>" (0), "</s>" (1), "<unk>" (2), "▁", then each printable character
    (no sentinel ``<extra_id_*>`` tokens); unseen characters map to "<unk>"."""
    from transformers import T5TokenizerFast

    chars = ["▁", *(c for c in string.printable if not c.isspace())]
    vocab = [(s, 0.0) for s in T5_SPECIALS] + [(c, -1.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_clip_config(vocab_size: int, width: int = 16, projection_dim: int = 16):
    """A 2-layer CLIP text config for ``clip_tokenizer`` (77 positions, eos/pad id 1)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_t5_config(vocab_size: int, width: int = 32):
    """A 1-layer T5 v1.1-style encoder config (gated GELU) for ``t5_tokenizer``."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=1,
        num_heads=width // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
