"""Hugging Face causal LMs behind the :class:`TokenPolicy` interface, and a tiny
sentencepiece trainer so tests never need a download."""

from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import TokenMDPError
from . import fast_gpt2, gated_mlp, shared_prompt
from .base import FrozenLinear, TokenPolicy


class HFCausalLMPolicy(TokenPolicy):
    """Wraps ``AutoModelForCausalLM``. Left padding is handled with explicit position ids;
    decoding reuses the KV cache. ``vocab_size`` may be smaller than the model's (the
    extra ids are input-only specials such as a guide token, or a model's padded rows).

    With ``lora`` (a dict of ``r``, ``alpha``, ``dropout``, ``target_modules``) the model
    is wrapped by ``peft``: only the adapter trains, and :meth:`reference_view` is the
    base model with the adapter switched off (no second copy of the weights)."""

    #: ``forward(..., logits_to_keep=n)`` computes the output layer on the last n positions only.
    supports_logits_to_keep = True
    supports_autocast = True
    #: :meth:`response_hidden` runs the leading positions that rows share once
    #: (:mod:`.shared_prompt`); bench/step_means.py switches it off to measure it.
    share_prompt = True
    #: Gated MLPs keep ``gate`` and ``up`` for the backward and recompute the activation
    #: (:mod:`.gated_mlp`, bit-identical gradients); bench/step_means.py switches it off.
    recompute_gated_activations = True
    #: Set by ``sharding.shard_policy`` (``train.sharding = "fsdp"``).
    sharded = False

    def __init__(
        self,
        model,
        vocab_size: int | None = None,
        lora: dict | None = None,
        source: str | None = None,
        fast_path: bool = True,
    ):
        super().__init__()
        self.source = source
        self.fast_path = fast_path
        #: :meth:`enable_gradient_checkpointing` was called (``train.gradient_checkpointing``)
        self.gradient_checkpointing = False
        if self.vocab_size_of(model) is None:
            raise TokenMDPError(f"model {source or type(model).__name__} has no vocab_size in its config")
        model_vocab = self.vocab_size_of(model)
        self.vocab_size = vocab_size or model_vocab
        if self.vocab_size > model_vocab:
            raise TokenMDPError(
                f"the env's vocabulary has {self.vocab_size} tokens but the model"
                f"{' at ' + repr(source) if source else ''} has vocab_size {model_vocab}: the tokenizer and "
                "the model do not match (use the tokenizer the model was trained with)"
            )
        # transformers >= 5 renamed ``past_key_values`` to ``cache``; accept both.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(output_layer) is torch.nn.Linear:
            output_layer.__class__ = OutputLayer  # the same module (tied weights, names), another forward
        elif output_layer is not None:
            output_layer.register_forward_pre_hook(_contiguous_input)
        if self.recompute_gated_activations:
            gated_mlp.recompute_activations(model)
        self.lora = dict(lora) if lora else None
        if self.lora:
            model = _add_lora(model, self.lora)
        self.model = model

    @property
    def max_positions(self) -> int | None:
        """The longest sequence (prompt + response) the model can place, or None if unbounded."""
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @staticmethod
    def vocab_size_of(model) -> int | None:
        config = model.config
        return getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)

    @property
    def has_adapter(self) -> bool:
        return self.lora is not None

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the base model: the LoRA adapter off (and dropout off) inside the block."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self.model.train(was_training)

    def reference_view(self) -> TokenPolicy | None:
        return AdapterDisabledReference(self) if self.has_adapter else None

    def checkpoint_state(self) -> dict[str, Any]:
        """With LoRA, the adapter only (the base is reloaded from ``policy.path``): a
        Gemma-3 270M checkpoint with r = 16 is 46 MB (with the optimiser state), not 1.1 GB."""
        if not self.has_adapter:
            return self.state_dict()
        return {"adapter": {name: p.detach() for name, p in self._adapter_parameters().items()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if not self.has_adapter or "adapter" not in state:
            self.load_state_dict(state)  # full weights (a run without LoRA, or an older checkpoint)
            return
        trainable = {name: p.shape for name, p in self._adapter_parameters().items()}
        saved = {name: v.shape for name, v in state["adapter"].items()}
        if saved != trainable:
            wrong = sorted(set(saved) ^ set(trainable)) or [k for k in saved if saved[k] != trainable[k]]
            raise TokenMDPError(
                "the checkpoint's LoRA adapter does not fit this policy (a different policy.lora "
                f"or model): {len(saved)} saved tensors, {len(trainable)} expected; first "
                f"mismatch {wrong[0]!r}"
            )
        self.load_state_dict(state["adapter"], strict=False)

    def _adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """With LoRA, the trainable parameters are exactly the adapter's."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        vocab_size: int | None = None,
        seed: int = 0,
        lora: dict | None = None,
        fast_path: bool = True,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = dict(config)
        model_type = config.pop("model_type", "gpt2")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
        return cls(model, vocab_size, lora=lora, fast_path=fast_path)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, vocab_size: int | None = None, lora: dict | None = None, fast_path: bool = True
    ):
        from transformers import AutoModelForCausalLM

        if not Path(path).is_dir():
            raise TokenMDPError(f"policy.path: model directory {str(path)!r} does not exist")
        if not (Path(path) / "config.json").is_file():
            raise TokenMDPError(
                f"policy.path: {str(path)!r} holds no model (no config.json); save one with "
                "save_pretrained, or run `tokenmdp models fetch-gemma DIR`"
            )
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one line per error on stderr, not a progress bar first
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except Exception as exc:
            raise TokenMDPError(
                f"policy.path: could not load a causal LM from {str(path)!r}: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return cls(model, vocab_size, lora=lora, source=str(path), fast_path=fast_path)

    @staticmethod
    def _positions(mask: Tensor) -> Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def _full(self, input_ids, attention_mask, **kwargs):
        """One uncached forward over whole sequences (positions from the padding mask)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self.autocast():
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=self._positions(attention_mask),
                use_cache=False,
                **kwargs,
            )

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        decoder = self.fast_decoder
        if decoder is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            with self.autocast():
                return decoder.forward(input_ids, attention_mask, logits_to_keep)[..., : self.vocab_size]
        return self._full(input_ids, attention_mask, logits_to_keep=logits_to_keep).logits[..., : self.vocab_size]

    @property
    def supports_hidden_states(self) -> bool:
        """Whether :meth:`response_hidden` can hand the output layer to a caller that applies
        it a chunk of positions at a time (``train.logit_chunk``, tokenmdp/plugin/chunked.py):
        yes, unless the model is sharded (``train.sharding = "fsdp"``), whose weights exist
        whole only inside the model's own forward; a sharded run takes the whole logits.
        Read off :attr:`sharded`, not the weight's type (FSDP2 may hold a root module's
        parameters unsharded between its forward and backward)."""
        return not self.sharded

    def response_hidden(self, input_ids, attention_mask, keep: int):
        """``([B, keep, width], head)``: the last hidden states of the last ``keep``
        positions, and the function that turns hidden states into this model's logits
        (:meth:`output_logits`), so that a caller can apply it in chunks."""
        decoder = self.fast_decoder
        shared = shared_prompt.find(input_ids, attention_mask, keep) if self._may_share() else None
        if decoder is not None:
            with self.autocast():
                if shared is not None:
                    return decoder.shared_hidden(input_ids, attention_mask, keep, shared), self.output_logits
                return decoder.forward(input_ids, attention_mask, keep, hidden=True), self.output_logits
        if shared is not None:
            return self._shared_hidden(input_ids, attention_mask, shared), self.output_logits
        return self.hidden_states(input_ids, attention_mask)[:, -keep:], self.output_logits

    def _may_share(self) -> bool:
        """Whether this forward may share leading positions between rows: not when the
        library checkpoints its blocks (it turns the cache off in a training forward), and
        not for a sharded model (:func:`tokenmdp.sharding.shard_policy`: FSDP's gathers must
        match on every rank, and sharing makes the number of model calls depend on the rows)."""
        if not self.share_prompt or self.sharded:
            return False
        return not (self.gradient_checkpointing and self.model.training and torch.is_grad_enabled())

    def _shared_hidden(self, input_ids, attention_mask, shared):
        """The library's forward in two calls: the shared leading rows once, with a cache,
        that cache repeated to the batch's rows (``reorder_cache``, gradients kept), then
        every row's last positions reading it; the last layer's hidden states of those."""
        lead = shared.length
        with self.autocast():
            out = self.model(
                input_ids=shared.ids,
                attention_mask=shared.mask,
                position_ids=self._positions(shared.mask),
                use_cache=True,
                logits_to_keep=_none_kept(input_ids),
            )
            past = self._cache_of(out)
            past.reorder_cache(shared.rows)
            return self.model(
                input_ids=input_ids[:, lead:],
                attention_mask=attention_mask,
                position_ids=self._positions(attention_mask)[:, lead:],
                use_cache=True,
                output_hidden_states=True,
                logits_to_keep=_none_kept(input_ids),
                **{self._cache_arg: past},
            ).hidden_states[-1]

    def output_logits(self, hidden):
        """This model's logits from its last hidden states: the output layer (under the
        policy's autocast) and, where the model has one (Gemma 2), its final soft cap, as
        its own forward computes them."""
        with self.autocast():
            logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits[..., : self.vocab_size]

    def frozen_output_layer(self):
        """The output layer as a :class:`~tokenmdp.policies.base.FrozenLinear` when it takes
        no gradient (a LoRA policy's, which peft leaves alone) and is a plain linear layer
        with nothing after it (no soft cap, not sharded); else None."""
        head = self.model.get_output_embeddings()
        plain = type(head) in (torch.nn.Linear, OutputLayer) and type(head.weight.data) is torch.Tensor
        if not plain or head.weight.requires_grad or getattr(self.model.config, "final_logit_softcapping", None):
            return None
        if head.bias is not None and head.bias.requires_grad:
            return None
        return FrozenLinear(head.weight, head.bias, self.vocab_size, self.autocast_dtype)

    def hidden_states(self, input_ids, attention_mask=None):
        """``[B, L, width]``: the last layer's hidden state at every position (a critic's
        input); the output layer is skipped."""
        return self._full(
            input_ids, attention_mask, output_hidden_states=True, logits_to_keep=_none_kept(input_ids)
        ).hidden_states[-1]

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every transformer block in training forwards (``train.gradient_checkpointing``):
        the library's own, non-reentrant (``use_reentrant=False``: the recomputation needs no
        input that requires grad, so a LoRA model's frozen embeddings are fine; the
        input-grad hook is added anyway, as TRL does for peft models). Only the library's
        forward checkpoints, so :attr:`fast_decoder` steps aside for gradient forwards in
        train mode; sampling and no-grad scoring keep the fast path."""
        model = self.model.get_base_model() if self.has_adapter else self.model
        kwargs = {"use_reentrant": False}
        try:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: the old name warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        except ValueError as exc:  # a model without checkpointable layers
            raise TokenMDPError(f"train.gradient_checkpointing: {exc}") from None
        if self.has_adapter and getattr(model, "_require_grads_hook", None) is None:
            model.enable_input_require_grads()
        self.gradient_checkpointing = True

    @property
    def fast_decoder(self) -> fast_gpt2.GPT2Decoder | None:
        """:mod:`.fast_gpt2` on this model where it reproduces it exactly (a plain GPT-2
        without an adapter, ``policy.fast_path`` on, no dropout active, and no gradient
        checkpointing to do), else None."""
        if not self.fast_path or self.has_adapter or not fast_gpt2.supports(self.model):
            return None
        if self.gradient_checkpointing and self.model.training and torch.is_grad_enabled():
            return None  # a training forward: the library's checkpoints its blocks, the fast path cannot
        if fast_gpt2.dropout_active(self.model):
            return None
        return fast_gpt2.GPT2Decoder(self.model)

    def start(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        decoder = self.fast_decoder
        if decoder is not None:
            with self.autocast():
                logits, cache = decoder.start(input_ids, attention_mask)
            return logits[:, : self.vocab_size], (decoder, cache)
        positions = self._positions(attention_mask)
        with self.autocast():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,  # the output layer on the last position only (Gemma-3: 1.6 s at 8 x 20)
            )
        return out.logits[:, -1, : self.vocab_size], (self._cache_of(out), attention_mask, positions[:, -1])

    def _cache_of(self, out):
        return out["cache"] if "cache" in out else out["past_key_values"]

    def reindex_state(self, state, index):
        if isinstance(state[0], fast_gpt2.GPT2Decoder):
            decoder, cache = state
            return decoder, cache.select(index)
        past, mask, last_pos = state
        past.reorder_cache(index)  # index_select on every layer; repeats allowed
        return past, mask[index], last_pos[index]

    def advance(self, state, tokens):
        if isinstance(state[0], fast_gpt2.GPT2Decoder):
            decoder, cache = state
            with self.autocast():
                logits, cache = decoder.advance(cache, tokens)
            return _first_columns(logits, self.vocab_size), (decoder, cache)
        past, mask, last_pos = state
        mask = torch.cat([mask, torch.ones_like(tokens[:, None])], dim=1)
        pos = last_pos + 1
        with self.autocast():
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=pos[:, None],
                use_cache=True,
                **{self._cache_arg: past},
            )
        return out.logits[:, -1, : self.vocab_size], (self._cache_of(out), mask, pos)


class AdapterDisabledReference(TokenPolicy):
    """The reference of a LoRA policy: the same module with its adapter switched off.

    It holds the policy outside ``nn.Module`` registration, so it has no parameters and
    no state of its own (``requires_grad_``/``eval`` on it never touch the policy)."""

    supports_logits_to_keep = True

    def __init__(self, policy: HFCausalLMPolicy):
        super().__init__()
        self.vocab_size = policy.vocab_size
        self._policy = [policy]  # a list: not a registered submodule

    @property
    def policy(self) -> HFCausalLMPolicy:
        return self._policy[0]

    @property
    def parameters_of(self) -> HFCausalLMPolicy:
        """The module whose parameters this view runs (what ``tokenmdp.sharding.gathered``
        gathers for it)."""
        return self.policy

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0):
        with self.policy.adapter_disabled():
            return self.policy(input_ids, attention_mask, logits_to_keep=logits_to_keep)

    @property
    def supports_hidden_states(self) -> bool:
        return self.policy.supports_hidden_states

    def response_hidden(self, input_ids, attention_mask, keep: int):
        with self.policy.adapter_disabled():
            hidden, _ = self.policy.response_hidden(input_ids, attention_mask, keep)
        return hidden, self.output_logits

    def output_logits(self, hidden):
        with self.policy.adapter_disabled():  # an adapter on the output layer is off too
            return self.policy.output_logits(hidden)

    def start(self, input_ids, attention_mask=None):
        with self.policy.adapter_disabled():
            return self.policy.start(input_ids, attention_mask)

    def reindex_state(self, state, index):
        return self.policy.reindex_state(state, index)

    def advance(self, state, tokens):
        with self.policy.adapter_disabled():
            return self.policy.advance(state, tokens)


class OutputLayer(torch.nn.Linear):
    """An HF model's ``nn.Linear`` output layer with two ways of multiplying that give the
    same logits (to float32 rounding), chosen by shape:

    * its input made contiguous first (:func:`_contiguous_input`);
    * a few rows without gradient against a large weight (decoding: one row per sequence)
      as ``W @ x^T``: torch's ``linear`` (``x @ W^T``) reads Gemma-3's 262,144 x 640 weight
      at about half the speed there (8 rows, 2 threads: 107 ms against 48 ms;
      docs/performance.md, section 9). Elsewhere (training, many rows, small models) it is
      ``linear`` as before."""

    #: The rows (and least weight elements) where ``W @ x^T`` was measured faster.
    FEW_ROWS = range(2, 33)
    LARGE = 1 << 24

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        rows = x.numel() // x.shape[-1]
        few = rows in self.FEW_ROWS and self.weight.numel() >= self.LARGE and x.device.type == "cpu"
        if few and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            out = (self.weight @ x.reshape(rows, -1).t()).t().contiguous()
            out = out if self.bias is None else out + self.bias
            return out.view(*x.shape[:-1], -1)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _first_columns(logits: Tensor, n: int) -> Tensor:
    """``logits[:, :n]``, without the slicing op when that is all of them (once per decoded token)."""
    return logits if logits.shape[-1] == n else logits[:, :n]


def _none_kept(input_ids: Tensor) -> Tensor:
    """``logits_to_keep`` for a forward that wants the hidden states only: no position (an
    empty index), so the model's output layer runs on nothing. ``logits_to_keep = 1`` ran it
    on the last position of every row: 121 ms of Gemma-3's 262k-row layer per 8-row
    training forward, never read (docs/performance.md, section 9)."""
    return torch.empty(0, dtype=torch.long, device=input_ids.device)


def _contiguous_input(module, args):
    """The output layer's input as one contiguous block. With ``logits_to_keep`` the
    library hands it a strided slice of the hidden states, which torch multiplies as a
    batched matmul against an expanded weight: 1.34 s against 0.71 s for Gemma-3's
    262k-row output layer on 8 x 17 positions at 2 threads (docs/performance.md)."""
    return (args[0].contiguous(), *args[1:])


def _add_lora(model, lora: dict):
    try:
        import peft
    except ImportError:
        raise TokenMDPError('policy.lora needs peft: pip install "torch==2.13.0" -e ".[lora]"') from None
    lora = dict(lora)
    valid = {"r", "alpha", "dropout", "target_modules"}
    unknown = sorted(set(lora) - valid)
    if unknown:
        raise TokenMDPError(f"policy.lora: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    r = lora.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise TokenMDPError(f"policy.lora.r must be a positive integer (got {r!r})")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=lora.get("alpha", 2 * r),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", "all-linear"),
        task_type="CAUSAL_LM",
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D "fan_in_fan_out" notice
        return peft.get_peft_model(model, config)


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str = "bpe"):
    """Train a sentencepiece model in memory (well under a second on a few KB of text)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type=model_type,
        bos_id=1,
        eos_id=2,
        pad_id=0,
        unk_id=3,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())
