"""The token MDP on real text (``tokenmdp/Text-v0``): tokenizers, prompt files, reward
callables and :class:`TextTask`; the toy-to-text bridge and Gemma-3 270M from pip live in
:mod:`tokenmdp.text.bridge` and :mod:`tokenmdp.text.gemma`."""

from .callables import resolve_callable
from .lexicon import NEGATIVE_WORDS, POSITIVE_WORDS, lexicon_score, lexicon_spans
from .prompts import read_prompts
from .task import TextTask
from .tokenizers import TextTokenizer, load_tokenizer, sentencepiece_adapter

__all__ = [
    "NEGATIVE_WORDS",
    "POSITIVE_WORDS",
    "TextTask",
    "TextTokenizer",
    "lexicon_score",
    "lexicon_spans",
    "load_tokenizer",
    "read_prompts",
    "resolve_callable",
    "sentencepiece_adapter",
]
