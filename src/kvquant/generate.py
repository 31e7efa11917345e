"""Text generation with the compressed cache (the pieces behind ``kvquant generate``)."""

from __future__ import annotations

import torch

from .cache import KVQuantCache
from .calibration import cache_kwarg
from .quantizer import Quantizer


def _encode_prompt(tokenizer, prompt: str, device) -> dict:
    """Tokenize ``prompt``, through the chat template when the tokenizer has one (instruct models)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {k: v.to(device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}
    enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    quantizer: Quantizer | str,
    max_new_tokens: int = 128,
    recent_window: int | None = None,
    stream: bool = True,
    sliding_layers: str = "quantized",
    **generate_kwargs,
) -> tuple[str, dict]:
    """Generate a continuation of ``prompt`` with a :class:`KVQuantCache`.

    Streams the text to stdout as it is produced (``stream=True``, transformers' ``TextStreamer``) and returns
    ``(generated text, cache.memory_report())``. ``generate_kwargs`` go to ``model.generate`` (default: greedy).
    ``sliding_layers``: as :class:`KVQuantCache`'s (``"fp16"`` keeps sliding-window layers unquantized).
    Raises ``QuantizerError`` for a quantizer of another model and ``ContextLengthError`` past the model's context.
    """
    from transformers import TextStreamer

    cache = KVQuantCache(quantizer, model, recent_window=recent_window, sliding_layers=sliding_layers)
    inputs = _encode_prompt(tokenizer, prompt, model.device)
    limit = cache.max_positions
    n_prompt = inputs["input_ids"].shape[1]
    if limit and n_prompt + max_new_tokens > limit:
        from .cache import ContextLengthError

        raise ContextLengthError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context limit of "
            f"{limit} tokens; shorten the prompt or lower max_new_tokens."
        )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    kwargs = {"do_sample": False, **generate_kwargs}
    if tokenizer.pad_token_id is None and getattr(tokenizer, "eos_token_id", None) is not None:
        kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, streamer=streamer, **{cache_kwarg(model): cache}, **kwargs
    )
    text = tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True)
    return text, cache.memory_report()


__all__ = ["generate_text"]
