"""One evaluation harness: perplexity and KL divergence against the unquantized model, every method on the same windows.

Each window is run once unquantized (the reference distribution) and once per method, with every token attending to
the method's quantized keys and values (stored-and-decoded through :mod:`kvquant.evaluation.methods`). Methods with an
fp16 recent window use band attention: a query sees the ``R`` most recent keys/values in fp16 and older ones quantized,
exactly what a cache that quantizes tokens when they leave the window gives during generation.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import attention as kv_attention
from ..calibration import TapCache, cache_kwarg, check_finite
from ..core.rope import rope_specs
from .methods import FP16, Method

# The band attention (and its hand-over from cache to attention) is the compressed cache's own "kvquant" attention:
# simulated evaluation and KVQuantCache use one implementation.
SIM_ATTENTION = kv_attention.ATTENTION_NAME


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
        band = ("band", k, v, self.method.recent_window) if self.method.recent_window else None
        kv_attention.set_pending(i, band)
        return kh, vh


def use_sim_attention(model) -> None:
    """Route attention through the band-aware ``"kvquant"`` function (plain SDPA for everything else)."""
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
