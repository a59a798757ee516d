"""``env.judges``: scores of held-out completions that no method trains on.

A judge is written like a reward (TRL's keyword form, or tokenmdp's ``(prompt, completion)
-> float``; :mod:`.rewards`), or is a built-in name (:data:`BUILT_IN`). The sampled
evaluation calls every judge on the held-out responses it draws and logs each one's mean,
standard error and win rate against the reference (``judge/NAME``, ``judge/NAME_se``,
``judge/NAME_win_rate``; docs/metrics.md); training never calls them. So a run can be
judged by something it was not optimised for, e.g. ``vader``: VADER's compound sentiment
(the ``vaderSentiment`` package, a lexicon and rules written elsewhere; extra ``judges``).
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import ConfigError, RewardError
from .rewards import RewardSet

#: Built-in judges: name -> ``module:function``.
BUILT_IN = {"vader": "tokenmdp.text.judges:vader"}


@functools.cache
def _vader_analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError(
            'env.judges "vader" needs the vaderSentiment package: pip install -c constraints.txt '
            '"torch==2.13.0" -e ".[judges]"'
        ) from None
    return SentimentIntensityAnalyzer()


def vader(completions: list, **kwargs) -> list[float]:
    """VADER's compound sentiment of each completion, in [-1, 1] (a conversation's content)."""
    analyzer = _vader_analyzer()
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def judge_name(spec: Any) -> str:
    """The name a judge's metrics carry: a built-in's name, else the function's."""
    if isinstance(spec, str):
        return spec if spec in BUILT_IN else spec.rsplit(":", 1)[-1]
    return getattr(spec, "__name__", type(spec).__name__)


class Judges:
    """The judges of ``env.judges``, each scored on its own (never summed)."""

    def __init__(self, specs: list, timeout: float | None):
        self.sets: dict[str, RewardSet] = {}
        for spec in specs:
            name = judge_name(spec)
            if name in self.sets:
                raise ConfigError(f"env.judges: two judges are named {name!r}; each judge's metrics carry its name")
            if spec == "vader":
                _vader_analyzer()  # a missing package is a start-up error, not one at the first evaluation
            self.sets[name] = RewardSet(BUILT_IN.get(spec, spec), None, timeout, key="env.judges")

    def score(self, **batch) -> dict[str, list[float]]:
        """Each judge's scores of one batch of responses (``RewardSet.score``'s arguments). A
        judge that raises or returns what is not a score is a ``RewardError`` that calls it
        a judge (a reward's checks word their errors for rewards)."""
        scores = {}
        for name, judge in self.sets.items():
            try:
                scores[name] = judge.score(**batch)
            except RewardError as exc:
                message = str(exc).replace(f"reward {judge.name!r}", f"judge {judge.name!r} (env.judges)", 1)
                raise RewardError(message) from exc
        return scores
