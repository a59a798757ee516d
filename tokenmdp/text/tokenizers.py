"""One small tokenizer interface over a Hugging Face tokenizer directory or a
sentencepiece model (``env.tokenizer``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError


class TextTokenizer:
    """One small interface over a Hugging Face tokenizer or a sentencepiece model.

    ``encode`` never adds special tokens; :class:`TextTask` adds BOS itself."""

    def __init__(
        self,
        source: str,
        vocab_size: int,
        encode: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        bos: int | None,
        eos: int | None,
        pad: int | None,
        adds_bos: bool,
        chat: Callable[[list[dict]], str] | None = None,
        bos_text: str | None = None,
    ):
        self.source = source
        self.vocab_size = vocab_size
        self._encode, self._decode = encode, decode
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos, eos, pad
        #: Whether the tokenizer itself would put BOS in front of a text (Gemma, sentencepiece).
        self.adds_bos = adds_bos
        self._chat, self._bos_text = chat, bos_text

    @property
    def has_chat_template(self) -> bool:
        return self._chat is not None

    def apply_chat_template(self, messages: list[dict], strip_bos: bool = True) -> str:
        """``messages`` (TRL's conversational format: ``{"role", "content"}`` dicts) as the
        text of a prompt, through the tokenizer's chat template with the generation prompt.
        With ``strip_bos`` a leading BOS the template writes is dropped (for a task that
        places BOS itself), so a prompt never starts with two."""
        if self._chat is None:
            raise ConfigError(f"env.chat_template: tokenizer {self.source!r} has no chat template")
        text = self._chat(messages)
        if strip_bos and self._bos_text and text.startswith(self._bos_text):
            text = text[len(self._bos_text) :]
        return text

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self._decode(ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _sentencepiece_tokenizer(path: Path) -> TextTokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise ConfigError(f"env.tokenizer: {str(path)!r} is not a sentencepiece model: {exc}") from None
    return sentencepiece_adapter(sp, str(path))


def sentencepiece_adapter(sp, source: str = "sentencepiece") -> TextTokenizer:
    """Wrap a ``SentencePieceProcessor`` (e.g. from ``train_sentencepiece``)."""
    special = {i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0}
    return TextTokenizer(
        source,
        sp.get_piece_size(),
        encode=lambda text: sp.encode(text),
        decode=lambda ids: sp.decode([i for i in ids if i not in special]),
        bos=sp.bos_id() if sp.bos_id() >= 0 else None,
        eos=sp.eos_id() if sp.eos_id() >= 0 else None,
        pad=sp.pad_id() if sp.pad_id() >= 0 else None,
        adds_bos=sp.bos_id() >= 0,
    )


def _hf_tokenizer(path: Path) -> TextTokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ConfigError(
            f"env.tokenizer: could not load a Hugging Face tokenizer from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from None
    return hf_tokenizer_adapter(tok, str(path))


def hf_tokenizer_adapter(tok, source: str = "a Python object") -> TextTokenizer:
    """Wrap a loaded Hugging Face tokenizer (``AutoTokenizer.from_pretrained(...)``)."""
    probe = tok("a", add_special_tokens=True)["input_ids"]
    adds_bos = tok.bos_token_id is not None and bool(probe) and probe[0] == tok.bos_token_id
    return TextTokenizer(
        source,
        len(tok),
        encode=lambda text: tok.encode(text, add_special_tokens=False),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        pad=tok.pad_token_id,
        adds_bos=adds_bos,
        chat=(
            (lambda messages: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            if getattr(tok, "chat_template", None)
            else None
        ),
        bos_text=tok.bos_token,
    )


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A sentencepiece ``.model`` file, a directory a Hugging Face tokenizer loads from, or
    a loaded Hugging Face tokenizer (given to ``tokenmdp.train``)."""
    if hasattr(path, "convert_ids_to_tokens") and hasattr(path, "decode"):
        return hf_tokenizer_adapter(path)
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(
            "env.tokenizer is required: a Hugging Face tokenizer directory or a sentencepiece .model file"
        )
    p = Path(path)
    if p.is_file():
        return _sentencepiece_tokenizer(p)
    if p.is_dir():
        return _hf_tokenizer(p)
    raise ConfigError(
        f"env.tokenizer: {str(path)!r} does not exist (expected a Hugging Face tokenizer "
        "directory or a sentencepiece .model file)"
    )
