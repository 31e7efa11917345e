"""One evaluation harness: perplexity and KL divergence against the unquantized model, every method on the same windows.

Each window is run once unquantized (the reference distribution) and once per method, with every token attending to
the method's quantized keys and values (stored-and-decoded through :mod:`kvquant.evaluation.methods`). Methods with an
fp16 recent window use band attention: a query sees the ``R`` most recent keys/values in fp16 and older ones quantized,
exactly what a cache that quantizes tokens when they leave the window gives during generation.
"""

from __future__ import annotations

import math
import threading
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..calibration import TapCache, cache_kwarg, check_finite
from ..core.rope import rope_specs
from .methods import FP16, Method

SIM_ATTENTION = "kvquant_sim"
_pending = threading.local()


def _band_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention where queries use fp16 keys/values for their ``R`` most recent positions (see module docstring)."""
    store = getattr(_pending, "kv", None)
    pend = store.pop(module.layer_idx, None) if store else None
    if pend is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    k_fp, v_fp, window, offset = pend
    rep = query.shape[1] // key.shape[1]
    kq, vq = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    kf, vf = k_fp.repeat_interleave(rep, 1), v_fp.repeat_interleave(rep, 1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    tq, tk = query.shape[2], key.shape[2]
    qpos = torch.arange(tk - tq, tk, device=query.device)[:, None] + offset
    kpos = torch.arange(tk, device=query.device)[None, :] + offset
    band = (qpos - kpos < window) & (qpos >= kpos)
    s = torch.where(band, query @ kf.transpose(-1, -2), query @ kq.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        m = attention_mask[..., :tk]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
    else:
        s = s.masked_fill(qpos < kpos, float("-inf"))
    p = s.softmax(-1).to(query.dtype)
    out = (p * band) @ vf + (p * ~band) @ vq
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SIM_ATTENTION, _band_attention)
try:  # the band attention consumes SDPA-style masks (padding, sliding windows)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(SIM_ATTENTION, sdpa_mask)
except ImportError:  # pragma: no cover - older transformers
    pass


class SimulatedCache(TapCache):
    """A cache that stores what ``method`` decodes from its real storage form (simulated evaluation)."""

    def __init__(self, model, method: Method, specs=None):
        self.method = method
        self.specs = specs or rope_specs(model)
        super().__init__(model.config, self._tap)

    def _tap(self, i, k, v, start):
        check_finite(k, "keys", i)
        check_finite(v, "values", i)
        kh, vh = self.method.fake(i, k, v, start, self.specs[i])
        if self.method.recent_window:
            if not hasattr(_pending, "kv"):
                _pending.kv = {}
            _pending.kv[i] = (k, v, self.method.recent_window, start)
        return kh, vh


def use_sim_attention(model) -> None:
    """Route attention through the band-aware function (it falls back to SDPA for everything else)."""
    model.set_attn_implementation(SIM_ATTENTION)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, methods: list[Method], progress: bool = True) -> list[dict]:
    """Perplexity and mean KL(P_ref || P_method) over ``windows`` [N, T] for every method; one row per method."""
    use_sim_attention(model)
    specs = rope_specs(model)
    kw = cache_kwarg(model)
    nll = {m.name: 0.0 for m in methods}
    kl = {m.name: 0.0 for m in methods}
    secs = {m.name: 0.0 for m in methods}
    for m in methods:
        m.reset_accounting()
    n_tok = 0
    bar = tqdm(total=len(windows) * len(methods), desc="evaluating", disable=not progress)
    for w in windows:
        ids = w[None].to(model.device)
        ref = model(ids).logits[0, :-1].float()
        ref_lp = F.log_softmax(ref, -1)
        ref_p = ref_lp.exp()
        del ref
        tgt = ids[0, 1:]
        n_tok += tgt.numel()
        for m in methods:
            t0 = time.perf_counter()
            if isinstance(m, FP16):  # the reference itself: no second forward needed
                lp = ref_lp
            else:
                cache = SimulatedCache(model, m, specs)
                lp = F.log_softmax(model(ids, use_cache=True, **{kw: cache}).logits[0, :-1].float(), -1)
            nll[m.name] += float(-lp.gather(-1, tgt[:, None]).sum())
            kl[m.name] += float((ref_p * (ref_lp - lp)).sum())
            secs[m.name] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix_str(f"{m.name}: ppl {math.exp(nll[m.name] / n_tok):.3f}")
    bar.close()
    rows = []
    for m in methods:
        rows.append(
            {
                "method": m.name,
                "family": m.family,
                "bits": m.bits,
                "outlier_fraction": m.outlier_fraction,
                "recent_window": m.recent_window,
                "effective_bits": round(m.effective_bits, 4),
                "ppl": math.exp(nll[m.name] / n_tok),
                "kl": kl[m.name] / n_tok,
                "seconds": round(secs[m.name], 2),
                "notes": m.notes,
            }
        )
    return rows
