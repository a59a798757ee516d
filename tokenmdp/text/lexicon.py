"""A small sentiment lexicon: ``lexicon_score`` (positive words minus negative words), the
ready-made reward of the text examples and of the toy-to-text bridge."""

from __future__ import annotations

import re

POSITIVE_WORDS = frozenset(
    """
good great happy glad joy joyful love lovely loved kind kindly helpful helpfully nice wonderful
beautiful excellent amazing awesome fantastic best better thank thanks grateful gratitude calm
peaceful warm warmly friendly friend friends gentle bright fun enjoy enjoyed enjoying delight
delightful pleasant hope hopeful smile smiles smiling laugh laughter cheerful positive care caring
support supportive welcome fine perfect brilliant success successful win proud safe sweet fresh
comfortable relaxing relaxed lucky gift free easy favorite favourite wow beloved sunny generous
""".split()
)

NEGATIVE_WORDS = frozenset(
    """
bad sad angry hate hated terrible awful horrible worst worse poor pain painful hurt cry crying
fear afraid scared sick ill tired boring bored lonely alone ugly stupid dumb annoying annoyed
upset unhappy miserable wrong fail failed failure problem problems difficult hard cold dark
dead death die died kill killed war fight fighting loss lost broken mess nasty rude cruel
disappointed disappointing worried worry anxious stress stressed tragic disaster never hopeless
""".split()
)

_WORD = re.compile(r"[a-z']+")


def lexicon_score(prompt: str, completion: str) -> float:
    """Rule-based sentiment of a completion: positive-lexicon words minus negative-lexicon
    words (lower-cased whole words; the prompt is ignored). A reward callable, and the
    evaluation score of ``bench/gemma_guide.py``."""
    words = _WORD.findall(completion.lower())
    return float(sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words))


def lexicon_spans(prompt: str, completion: str) -> list[tuple[int, int, float]]:
    """:func:`lexicon_score` as a dense reward: ``(start, end, +1)`` on each positive word of
    the completion, ``(start, end, -1)`` on each negative one, in characters (each value
    lands on its word's last token; docs/text.md, "Dense and step rewards"). The values add
    up to :func:`lexicon_score`."""
    spans = []
    for match in _WORD.finditer(completion.lower()):
        word = match.group()
        value = (word in POSITIVE_WORDS) - (word in NEGATIVE_WORDS)
        if value:
            spans.append((match.start(), match.end(), float(value)))
    return spans
