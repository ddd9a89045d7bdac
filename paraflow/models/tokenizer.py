"""A word-level CLIP-compatible tokenizer built in memory, so the tiny models need no download.

It is a `PreTrainedTokenizerFast`, so diffusers' pipelines call it exactly as they call CLIP's
tokenizer (padding to `model_max_length`, truncation, `batch_decode`) and `save_pretrained`
writes a folder that `from_pretrained` reads back.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

# The words the tiny models know: colours, shapes, places and the glue of simple captions.
DEFAULT_VOCABULARY = (
    "a an the and on in of at with background image picture photo "
    "red green blue yellow orange purple pink white black gray brown cyan "
    "circle square triangle star cross ring diamond "
    "left right top bottom center middle corner upper lower small big large "
    "one two three shape shapes object objects"
).split()


def build_word_tokenizer(
    words: tuple[str, ...] | list[str] = DEFAULT_VOCABULARY, max_length: int = 16
) -> PreTrainedTokenizerFast:
    """Return a lower-casing, whitespace/punctuation-splitting tokenizer over `words`."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    # Punctuation is dropped, so "a red circle, blue background" needs no comma token.
    core.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    core.pre_tokenizer = pre_tokenizers.Whitespace()
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
