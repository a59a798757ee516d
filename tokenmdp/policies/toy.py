"""Small trainable policies for toy vocabularies: tabular, MLP, GRU, tiny transformer.

An MLP over one-hot token slots cannot track a running statistic of the prefix (a sum
modulo k), so it fails the delayed-reward task; the GRU is the default toy policy.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import TokenPolicy, require_unpadded


class GRUPolicy(TokenPolicy):
    def __init__(self, input_vocab_size: int, vocab_size: int, hidden: int = 96, layers: int = 1):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(input_vocab_size, hidden)
        self.rnn = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.hidden_states(input_ids, attention_mask))

    def hidden_states(self, input_ids, attention_mask=None):
        """``[B, L, hidden]``: the GRU's output at every position (what the head reads)."""
        require_unpadded(attention_mask, "GRUPolicy")
        return self.rnn(self.embed(input_ids))[0]

    def start(self, input_ids, attention_mask=None):
        require_unpadded(attention_mask, "GRUPolicy")
        out, h = self.rnn(self.embed(input_ids))
        return self.head(out[:, -1]), h

    def reindex_state(self, state, index):
        return state[:, index]

    def advance(self, state, tokens):
        out, h = self.rnn(self.embed(tokens[:, None]), state)
        return self.head(out[:, -1]), h


class MLPPolicy(TokenPolicy):
    """Sees the last ``window`` tokens as one-hot slots; no memory beyond them."""

    def __init__(self, input_vocab_size: int, vocab_size: int, window: int = 8, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.vocab_size = vocab_size
        self.window = window
        self.slots = input_vocab_size + 1  # + an "empty slot" id
        dims = [window * self.slots] + [hidden] * layers
        blocks = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(d_in, d_out), nn.Tanh()]
        self.net = nn.Sequential(*blocks, nn.Linear(dims[-1], vocab_size))

    def forward(self, input_ids, attention_mask=None):
        require_unpadded(attention_mask, "MLPPolicy")
        empty = torch.full(
            (input_ids.shape[0], self.window - 1), self.slots - 1, dtype=input_ids.dtype, device=input_ids.device
        )
        slots = torch.cat([empty, input_ids], dim=1).unfold(1, self.window, 1)  # [B, L, window]
        one_hot = nn.functional.one_hot(slots, self.slots).float().flatten(2)
        return self.net(one_hot)


class TabularPolicy(TokenPolicy):
    """One logit vector per distinct context, found by a rolling hash into ``table_size``
    rows. Exact while the number of visited contexts is far below ``table_size``."""

    _MULT = 1_000_003
    _MOD = (1 << 61) - 1

    def __init__(self, input_vocab_size: int, vocab_size: int, table_size: int = 1 << 16):
        super().__init__()
        self.vocab_size = vocab_size
        self.table_size = table_size
        self.table = nn.Embedding(table_size, vocab_size)
        nn.init.zeros_(self.table.weight)

    def forward(self, input_ids, attention_mask=None):
        require_unpadded(attention_mask, "TabularPolicy")
        h = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        rows = []
        for i in range(input_ids.shape[1]):
            h = (h * self._MULT + input_ids[:, i] + 1) % self._MOD
            rows.append(h % self.table_size)
        return self.table(torch.stack(rows, dim=1))


class TransformerPolicy(TokenPolicy):
    def __init__(
        self,
        input_vocab_size: int,
        vocab_size: int,
        d_model: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_len: int = 64,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.embed = nn.Embedding(input_vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        require_unpadded(attention_mask, "TransformerPolicy")
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"TransformerPolicy: sequence of {length} tokens exceeds policy.max_len={self.max_len}")
        x = self.embed(input_ids) + self.pos(torch.arange(length, device=input_ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        return self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))


TOY_POLICIES: dict[str, type[TokenPolicy]] = {
    "gru": GRUPolicy,
    "mlp": MLPPolicy,
    "tabular": TabularPolicy,
    "transformer": TransformerPolicy,
}
