"""A word-level CLIP-compatible tokenizer built in memory, so the tiny models need no download.

It is a `PreTrainedTokenizerFast`, so diffusers' pipelines call it exactly as they call CLIP's
tokenizer (padding to `model_max_length`, truncation, `batch_decode`) and `save_pretrained`
writes a folder that `from_pretrained` reads back.
"""

from __future__ import annotations

import re
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_SPECIAL_TOKENS = (T5_PAD, T5_EOS, T5_UNK)  # T5's ids 0, 1, 2

# The words the tiny models know: colours, shapes, places and the glue of simple captions.
DEFAULT_VOCABULARY = (
    "a an the and on in of at with background image picture photo "
    "red green blue yellow orange purple pink white black gray brown cyan "
    "circle square triangle star cross ring diamond "
    "left right top bottom center middle corner upper lower small big large "
    "one two three shape shapes object objects"
).split()


def build_word_tokenizer(
    words: tuple[str, ...] | list[str] = DEFAULT_VOCABULARY, max_length: int = 16,
    t5: bool = False,
) -> PreTrainedTokenizerFast:
    """Return a lower-casing, whitespace/punctuation-splitting tokenizer over `words`: CLIP's
    conventions (start and end tokens), or with `t5` T5's (padding is token 0, an end token and
    no start token)."""
    specials, unk = (T5_SPECIAL_TOKENS, T5_UNK) if t5 else (SPECIAL_TOKENS, UNK)
    vocab = {token: i for i, token in enumerate(specials)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    # Punctuation is dropped, so "a red circle, blue background" needs no comma token.
    core.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if t5:
        core.post_processor = processors.TemplateProcessing(
            single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, vocab[T5_EOS])])
        return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=T5_EOS, pad_token=T5_PAD,
                                       unk_token=T5_UNK, model_max_length=max_length)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def unknown_words(tokenizer: Any, texts: list[str]) -> list[str]:
    """The words of `texts` that `tokenizer` maps to its unknown token, in first-seen order."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return []
    words = dict.fromkeys(w for text in texts for w in re.findall(r"[\w']+", text.lower()))
    return [w for w in words if unk in tokenizer(w, add_special_tokens=False).input_ids]
