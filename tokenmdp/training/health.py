"""Warnings for a text run going wrong: responses collapsing, or the policy running away from
the reference. Such a run can finish without an error while its model is wrecked (every
response two tokens long, reward 0); these say so once each, on stderr and in
``summary.json``'s ``warnings``. Toy runs need neither: they are scored against the exact
optimum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: A step's mean response length below this fraction of the run's first step's is a collapse.
LENGTH_COLLAPSE = 0.25
#: An evaluation's sampled ``kl_ref`` above this many nats per response token: the policy has
#: left the reference (a healthy run stays at a small fraction of a nat per token).
KL_PER_TOKEN_LIMIT = 1.0


class RunHealth:
    """Watches the rows a run logs (:meth:`observe`); ``warnings`` lists what it found."""

    def __init__(self, rows: Iterable[Mapping] = ()):
        self.first_length: float | None = None
        self.warnings: list[str] = []
        self._fired: set[str] = set()
        for row in rows:  # a resumed run: its earlier rows, replayed without printing
            self.observe(row)

    def observe(self, row: Mapping) -> list[str]:
        """The new warnings ``row`` (a ``metrics.jsonl`` line) raises."""
        found = []
        step = row.get("step")
        length = row.get("rollout/response_length")
        if length is not None:
            if self.first_length is None:
                self.first_length = length
            elif length < LENGTH_COLLAPSE * self.first_length:
                found += self._fire(
                    "length",
                    f"step {step}: the mean response length fell to {length:.2f} tokens, below "
                    f"{LENGTH_COLLAPSE:g} of the first step's {self.first_length:.2f}: the policy is collapsing "
                    "(lower updater.lr or updater.epochs, or raise train.beta)",
                )
        kl, tokens = row.get("kl_ref"), row.get("response_length")
        if kl is not None and tokens and kl / tokens > KL_PER_TOKEN_LIMIT:
            found += self._fire(
                "kl",
                f"step {step}: the held-out kl_ref is {kl:.2f} nats over {tokens:.2f} tokens per response, "
                f"above {KL_PER_TOKEN_LIMIT:g} nat per token: the policy has run away from the reference "
                "(lower updater.lr, or raise train.beta)",
            )
        return found

    def _fire(self, kind: str, message: str) -> list[str]:
        if kind in self._fired:
            return []
        self._fired.add(kind)
        self.warnings.append(message)
        return [message]
