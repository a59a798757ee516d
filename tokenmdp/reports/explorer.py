"""The credit explorer: ``tokenmdp explain``'s page, one self-contained HTML file.

Everything the page shows is one JSON document embedded in the page (``<script
type="application/json" id="explorer-data">``), read by the page's own inline script: no
network, no other file. :func:`page_data` builds it from an :class:`~.explain.Explanation`,
:func:`prefix_trees` adds a toy run's prefix trees, :func:`render` writes the page.

The JSON document (``version`` 1)::

    version    1
    title      str, the page's heading
    header     str, what was explained (run, checkpoint, sample sizes)
    truth      str, the label of the ground-truth row (``"true A*"``, ``"Monte-Carlo A (K=8)"``)
    selected   str, the row the tokens are coloured by when the page opens
    colours    [str], the diverging colour map (pink < 0 < green), a value x in [-1, 1] is
               colours[round((x + 1) / 2 * (len - 1))]
    rows       [{label, note, correlation: float | null, interval: [lo, hi] | null,
                 truth: bool}], every estimator, then the ground truth (last)
    skipped    {estimator: why it could not be built}
    responses  [{row, prompt, prompt_index, reward, tokens: [str], ids: [int],
                 policy_prob: [float], ref_prob: [float],       # exp of the sampled tokens' log-probs
                 credit: {label: [float]},                       # every row of ``rows``
                 stderr: {label: [float]}}]                      # optional, per token
    trees      [{prompt_index, prompt, nodes, shown, total, cut_reach, cut_limit}] (toy runs;
               [] otherwise); nodes[0] is the prompt's state, every other node is a branch
               (a token) {id, parent, depth, token, id_token, pi, ref, opt, a, r, reach_pi,
               reach_opt, end, kids: [ids], hidden: branches below it left out}
    limits     {min_reach, max_nodes}: what bounded the trees
    images     [{name, src}]: the static heat maps, as data URIs

Only the real tokens of a response are listed (padding after EOS is not). Numbers are
rounded to 6 significant digits; a NaN (a constant row's correlation) is ``null``.
"""

from __future__ import annotations

import heapq
import html
import itertools
import json
import math
import string
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch

CMAP = "PiYG"  # diverging: pink < 0 < green; white at 0
#: Entries of the embedded colour map (odd, so that 0 has its own, white, entry).
COLOURS = 101
#: The prefix trees keep the branches reached with at least this probability under pi or pi*...
MIN_REACH = 1e-3
#: ... and at most this many branches over all the page's trees.
MAX_TREE_NODES = 2000
SCHEMA_VERSION = 1


def colour_table(n: int = COLOURS) -> list[str]:
    """``n`` hex colours of the diverging map, from -1 (pink) through 0 (white) to +1 (green)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[CMAP]
    return [to_hex(cmap(k / (n - 1))) for k in range(n)]


def colour_of(x: float, table: Sequence[str]) -> str:
    """The page's colour of a scaled value ``x`` in [-1, 1] (the rule of the page's script)."""
    k = math.floor((x + 1) / 2 * (len(table) - 1) + 0.5)  # JavaScript's Math.round
    return table[min(max(k, 0), len(table) - 1)]


def _num(x: float) -> float | None:
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def _nums(values: Iterable[float]) -> list[float | None]:
    return [_num(x) for x in values]


def page_data(
    explanation,
    token_text: Callable[[int], str],
    prompt_text: Callable[[int], str],
    trees: Sequence[dict] = (),
    images: Sequence[Path] = (),
    title: str | None = None,
) -> dict:
    """The page's JSON document for an :class:`~.explain.Explanation`: its shown responses
    (``explanation.shown``, batch rows), each token's probabilities and every row's credit.

    ``token_text(id)`` and ``prompt_text(row)`` name tokens and prompts; ``trees`` come from
    :func:`prefix_trees` (toy runs); ``images`` are inlined as data URIs."""
    from .plots import png_data_uri

    e = explanation
    batch, truth = e.batch, e.truth
    stderr = getattr(e, "stderr", {}) or {}
    intervals = getattr(e, "intervals", {}) or {}
    responses = []
    for row in e.shown:
        length = int(batch.response_mask[row].sum())  # real tokens only: padding is not drawn
        ids = batch.response_ids[row, :length].tolist()
        responses.append(
            {
                "row": int(row),
                "prompt": prompt_text(row),
                "prompt_index": int(batch.prompt_index[row]),
                "reward": _num(batch.sequence_rewards[row]),
                "tokens": [token_text(a) for a in ids],
                "ids": ids,
                "policy_prob": _nums(batch.logprobs[row, :length].double().exp().tolist()),
                "ref_prob": _nums(batch.ref_logprobs[row, :length].double().exp().tolist()),
                "credit": {label: _nums(e.credit[label][row, :length].tolist()) for label in e.labels},
                "stderr": {label: _nums(err[row, :length].tolist()) for label, err in stderr.items()},
            }
        )
    rows = [
        {
            "label": label,
            "note": e.notes[label],
            "correlation": _num(e.correlations[label]),
            "interval": _nums(intervals[label]) if label in intervals else None,
            "truth": label == truth,
        }
        for label in e.labels
    ]
    return {
        "version": SCHEMA_VERSION,
        "title": title or f"Token credit against {truth}",
        "header": e.header,
        "truth": truth,
        "selected": e.labels[0],
        "colours": colour_table(),
        "rows": rows,
        "skipped": dict(e.skipped),
        "responses": responses,
        "trees": list(trees),
        "limits": {"min_reach": MIN_REACH, "max_nodes": MAX_TREE_NODES},
        "images": [{"name": Path(p).name, "src": png_data_uri(p)} for p in images],
    }


def prefix_trees(
    solution,
    policy_logp: list[torch.Tensor],
    prompt_indices: Sequence[int],
    token_text: Callable[[int], str],
    prompt_text: Callable[[int], str],
    max_nodes: int = MAX_TREE_NODES,
    min_reach: float = MIN_REACH,
) -> list[dict]:
    """The prefix tree below each prompt of a toy task, bounded: a branch (token ``a`` at
    state ``s``) is kept when the probability of reaching it, under ``pi`` (``policy_logp``,
    :func:`~tokenmdp.mdp.solver.tree_logprobs` of the run's policy) or under the solver's
    ``pi*``, is at least ``min_reach``, the likeliest first, up to ``max_nodes`` branches
    over all the trees (split evenly). Each branch carries ``pi``, ``pi_ref``, ``pi*``,
    ``A*`` and the reward of that token; what was left out is counted."""
    budget = max(1, max_nodes // max(1, len(prompt_indices)))
    tree = _TreeBuilder(solution, policy_logp, token_text, min_reach)
    return [tree.build(int(p), prompt_text(p), budget) for p in prompt_indices]


class _TreeBuilder:
    def __init__(self, solution, policy_logp, token_text, min_reach):
        task = solution.task
        self.solution, self.policy_logp, self.token_text, self.min_reach = solution, policy_logp, token_text, min_reach
        self.vocab, horizon = task.vocab_size, task.horizon
        self.ends = [task.ending_actions(t).tolist() for t in range(horizon)]
        self.advantages = [solution.advantages(t) for t in range(horizon)]
        self.total = 0  # branches of one prompt's whole tree (states after an EOS are unreachable)
        states = 1
        for t in range(horizon):
            self.total += states * self.vocab
            states *= self.vocab - sum(self.ends[t])

    def build(self, p: int, prompt: str, budget: int) -> dict:
        nodes = [{"id": 0, "parent": None, "depth": -1, "token": prompt, "kids": [], "hidden": 0}]
        heap: list[tuple] = []
        cut_reach, order = 0, itertools.count()

        def offer(parent: int, t: int, state: int, reach_pi: float, reach_opt: float) -> int:
            """Queue the branches of a state reached often enough; how many were not."""
            pi = self.policy_logp[t][p, state].double().exp().tolist()
            opt = self.solution.opt_logp[t][p, state].double().exp().tolist()
            cut = 0
            for a in range(self.vocab):
                rp, ro = reach_pi * pi[a], reach_opt * opt[a]
                if max(rp, ro) < self.min_reach:
                    cut += 1
                else:  # the likeliest first; ties in the order they were offered
                    heapq.heappush(heap, (-max(rp, ro), next(order), parent, t, state, a, rp, ro))
            nodes[parent]["hidden"] += cut
            return cut

        cut_reach += offer(0, 0, 0, 1.0, 1.0)
        s = self.solution
        while heap and len(nodes) - 1 < budget:
            _, _, parent, t, state, a, rp, ro = heapq.heappop(heap)
            end = bool(self.ends[t][a])
            node = {
                "id": len(nodes),
                "parent": parent,
                "depth": t,
                "token": self.token_text(a),
                "id_token": a,
                "pi": _num(self.policy_logp[t][p, state, a].double().exp()),
                "ref": _num(s.ref_logp[t][p, state, a].exp()),
                "opt": _num(s.opt_logp[t][p, state, a].exp()),
                "a": _num(self.advantages[t][p, state, a]),
                "r": _num(s.rewards[t][p, state, a]),
                "reach_pi": _num(rp),
                "reach_opt": _num(ro),
                "end": end,
                "kids": [],
                "hidden": 0,
            }
            nodes.append(node)
            nodes[parent]["kids"].append(node["id"])
            if not end:
                cut_reach += offer(node["id"], t + 1, state * self.vocab + a, rp, ro)
        for item in heap:  # cut by the node limit
            nodes[item[2]]["hidden"] += 1
        for node in nodes:
            node["kids"].sort(key=lambda k: nodes[k]["id_token"])
        return {
            "prompt_index": p,
            "prompt": prompt,
            "nodes": nodes,
            "shown": len(nodes) - 1,
            "total": self.total,
            "cut_reach": cut_reach,
            "cut_limit": len(heap),
        }


def embed_json(data: dict) -> str:
    """``data`` as JSON that is safe inside ``<script type="application/json">``: no ``<``,
    ``>`` or ``&`` appears (they are written as ``\\u003c`` ...), so a token text such as
    ``</script>`` cannot end the element; JSON.parse reads the same strings back."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028")):
        text = text.replace(char, escape)
    return text.replace("\u2029", "\\u2029")


def _asset(name: str) -> str:
    return (resources.files(__package__) / "templates" / name).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The self-contained HTML page of a :func:`page_data` document."""
    css, script = _asset("explorer.css"), _asset("explorer.js")
    assert "</style" not in css.lower() and "</script" not in script.lower() and "<!--" not in script
    return string.Template(_asset("explorer.html")).substitute(
        title=html.escape(data["title"]),
        header=html.escape(data["header"]),
        css=css,
        script=script,
        data=embed_json(data),
    )
