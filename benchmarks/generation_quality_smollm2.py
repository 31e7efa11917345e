"""Generation quality with the real compressed cache: does the fp16 recent window help at 2 bits?

Command (as run for the committed results):

    PYTHONPATH=src python3 benchmarks/generation_quality_smollm2.py --out benchmarks

For N prompts from the evaluation split, each cache generates a greedy continuation with `model.generate`. The fp16
model then scores every continuation (perplexity of the generated tokens under the unquantized model: lower = more
fluent / closer to what fp16 would say), and we report how many of the first generated tokens agree with fp16 greedy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvquant import KVQuantCache
from kvquant.calibration import CalibrationSettings, build_quantizer, cache_kwarg, collect_statistics
from kvquant.data import load_default_corpus, make_windows, split_documents
from kvquant.evaluation.report import environment, write_json
from kvquant.models import load_model
from kvquant.quantizer import QuantizerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--recent", type=int, default=128)
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", dtype=torch.float32, device=args.device)
    cal, ev = split_documents(load_default_corpus())
    stats = collect_statistics(model, make_windows(tok, cal, 1024, args.calib_windows),
                               CalibrationSettings(outlier_fractions=(0.01,)))
    prompts = make_windows(tok, ev, args.prompt_len, args.prompts, seed=1).to(args.device)
    caches = {"fp16 DynamicCache": lambda: DynamicCache(config=model.config)}
    for b in (2, 3):
        q = build_quantizer(stats, QuantizerConfig(bits=b, outlier_fraction=0.01, n_sinks=1))
        caches[f"nuq{b}-1%"] = lambda q=q: KVQuantCache(q, model, recent_window=0)
        caches[f"nuq{b}-1% prefill=quantized"] = lambda q=q: KVQuantCache(q, model, recent_window=0,
                                                                           prefill="quantized")
        caches[f"nuq{b}-1% window={args.recent}"] = lambda q=q: KVQuantCache(q, model, recent_window=args.recent)
    outs, rows = {}, []
    for name, make in caches.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(prompts, attention_mask=torch.ones_like(prompts), **{cache_kwarg(model): make()},
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        outs[name] = gen[:, prompts.shape[1]:]
        secs = time.perf_counter() - t0
        # Score the continuation with the fp16 model (fresh forward, no cache).
        with torch.no_grad():
            logits = model(gen).logits[:, prompts.shape[1] - 1 : -1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), outs[name].reshape(-1)).item()
        rows.append({"cache": name, "fp16_scored_ppl": math.exp(nll), "seconds": round(secs, 1)})
        print(rows[-1])
    ref = outs["fp16 DynamicCache"]
    for r in rows:
        o = outs[r["cache"]]
        same = (o == ref).float()
        first_diff = torch.where((o != ref).any(1), (o != ref).float().argmax(1), torch.full_like(o[:, 0], o.shape[1]))
        r["token_agreement"] = round(float(same.mean()), 4)
        r["mean_tokens_before_divergence"] = round(float(first_diff.float().mean()), 1)
    env = environment()
    doc = {"model": "SmolLM2-135M-Instruct", "prompts": args.prompts, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "recent_window": args.recent, "environment": env,
           "command": "PYTHONPATH=src python3 " + " ".join(sys.argv), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(doc, out / "generation_quality_smollm2.json")
    lines = ["# Generation quality with KVQuantCache (SmolLM2-135M)", "",
             f"Command: `{doc['command']}`  ",
             f"Machine: {env['machine']}, device {env['device']}; torch {env['torch']}, transformers "
             f"{env['transformers']}; {env['date']}.  ",
             f"{args.prompts} prompts of {args.prompt_len} tokens (evaluation split), {args.new_tokens} greedy tokens "
             "each through `model.generate` with each cache; continuations scored by the fp16 model.", "",
             "| cache | fp16-scored ppl of continuation | token agreement with fp16 | tokens before divergence |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['fp16_scored_ppl']:.3f} | {r['token_agreement']:.3f} | "
                     f"{r['mean_tokens_before_divergence']} |")
    (out / "generation_quality_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
