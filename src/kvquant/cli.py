"""The ``kvquant`` command line: calibrate, eval, run (the quick start), generate, passkey."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _add_model_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (offline default), a folder or a hub id")
    p.add_argument("--text", default="default", help="'default' (offline Wikipedia leads), a .txt file, a folder, "
                   "or hf:NAME[:CONFIG][:SPLIT] when online")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--seed", type=int, default=0)


def _add_sliding_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sliding-layers", choices=("quantized", "fp16"), default="quantized",
                   help="sliding-window layers (Gemma 3's local layers): compressed like the others (default), or "
                        "kept in fp16 (their window is bounded, so is the memory)")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _load(args):
    import torch

    from .models import load_model

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, dtype=torch.float32, device=args.device)
    return model, tok


def _windows(args, tok, part: str, n: int, window: int):
    from .data import load_text_source, make_windows, split_documents

    docs = load_text_source(args.text)
    if len(docs) == 1:  # one long document (a novel, a single file): split it by position instead
        text = docs[0]
        cut = len(text) // 2
        cal, ev = [text[:cut]], [text[cut:]]
    else:
        cal, ev = split_documents(docs, seed=args.seed)
    return make_windows(tok, cal if part == "calib" else ev, window, n, seed=args.seed)


def _context_window(model, window: int) -> int:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", window) or window
    return min(window, limit)


def _stats(args, model, tok, n_windows: int, window: int, fractions, value_groups=("token",),
           cache: Path | None = None):
    from .calibration import CalibrationSettings, collect_statistics, load_statistics, save_statistics

    if cache is not None and (cache / "stats.json").is_file():
        print(f"[kvquant] using cached calibration statistics in {cache}")
        return load_statistics(cache), 0.0
    cw = _windows(args, tok, "calib", n_windows, window)
    t0 = time.perf_counter()
    settings = CalibrationSettings(outlier_fractions=tuple(fractions), n_sinks=args.n_sinks,
                                   value_groups=tuple(value_groups))
    stats = collect_statistics(model, cw, settings)
    secs = time.perf_counter() - t0
    print(f"[kvquant] calibration on {cw.shape[0]} x {cw.shape[1]} tokens took {secs:.1f} s")
    if cache is not None:
        save_statistics(stats, cache)
    return stats, secs


def cmd_calibrate(args) -> int:
    from .calibration import build_quantizer
    from .quantizer import QuantizerConfig

    bits = [args.bits] if args.bits else [2, 3, 4]
    configs = [  # validated before the (slow) model load
        QuantizerConfig(bits=b, outlier_fraction=args.outlier_fraction, n_sinks=args.n_sinks, qnorm=args.qnorm,
                        fisher_weighting=args.weighting, recent_window=args.recent_window,
                        value_group=args.value_group)
        for b in bits
    ]
    model, tok = _load(args)
    window = _context_window(model, args.window)
    stats, _ = _stats(args, model, tok, args.windows, window, (args.outlier_fraction,),
                      value_groups=(args.value_group,))
    out = Path(args.out)
    for cfg in configs:
        q = build_quantizer(stats, cfg, name=f"{Path(args.model).name}-{cfg.name}")
        dest = out if len(bits) == 1 else out / cfg.name
        q.save(dest)
        print(f"[kvquant] wrote {dest} ({cfg.name})")
    return 0


def _report(rows, args, out: Path, title: str, extra: dict) -> None:
    from .evaluation.report import environment, markdown_table, plot_ppl_vs_bits, write_json

    out.mkdir(parents=True, exist_ok=True)
    ref = next(r["ppl"] for r in rows if r["family"] == "fp16")
    table = markdown_table(rows, ref)
    env = environment()
    doc = {"model": args.model, **extra, "environment": env, "rows": rows}
    write_json(doc, out / f"{args.name}.json")
    cmd = "kvquant " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("kvquant", "__main__.py")) \
        else " ".join(sys.argv)
    md = (f"# {title}\n\nCommand: `{cmd}`  \nMachine: {env['machine']}, device {env['device']}; torch "
          f"{env['torch']}, transformers {env['transformers']}, kvquant {env['kvquant']}; {env['date']}.\n\n"
          + "".join(f"- {k}: {v}\n" for k, v in extra.items()) + "\n" + table + "\n")
    (out / f"{args.name}.md").write_text(md)
    plot_ppl_vs_bits(rows, out / f"{args.name}.png", title)
    print(table)
    print(f"[kvquant] wrote {out / args.name}.{{md,json,png}}")


def _fp16_layers(args, model) -> tuple[int, ...]:
    """The layers ``--sliding-layers fp16`` keeps unquantized (the model's sliding-window layers)."""
    from .models import sliding_window_layers

    if getattr(args, "sliding_layers", "quantized") != "fp16":
        return ()
    layers = tuple(sliding_window_layers(model))
    if not layers:
        print(f"[kvquant] note: {args.model} has no sliding-window layers; --sliding-layers fp16 changes nothing.")
    return layers


def cmd_eval(args) -> int:
    from .evaluation.harness import evaluate
    from .evaluation.suite import baseline_methods, fp16_method, kvquant_methods
    from .models import model_identity
    from .quantizer import QuantizerConfig, load_quantizer

    model, tok = _load(args)
    window = _context_window(model, args.window)
    ident = model_identity(model)
    n_eval = max(1, -(-args.eval_tokens // (window - 1)))
    bits = tuple(args.bits_list)
    methods = [fp16_method()]
    fp16_layers = _fp16_layers(args, model)
    if args.quantizer:
        from .evaluation.methods import KVQuantMethod

        for qp in args.quantizer:
            q = load_quantizer(qp)
            q.check_model(ident)
            methods.append(KVQuantMethod(q, fp16_layers=fp16_layers))
    else:
        stats, _ = _stats(args, model, tok, args.calib_windows, window, (0.0, 0.01))
        methods += kvquant_methods(stats, bits, base=QuantizerConfig(n_sinks=args.n_sinks, qnorm=args.qnorm),
                                   extras=not args.fast, fp16_layers=fp16_layers)
    if not args.no_baselines:
        methods += baseline_methods(bits, ident["num_key_value_heads"] * ident["head_dim"])
    ew = _windows(args, tok, "eval", n_eval, window)
    rows = evaluate(model, ew, methods)
    _report(rows, args, Path(args.out), f"KV-cache quantization accuracy: {args.model}",
            {"eval_tokens": int(ew.shape[0] * (ew.shape[1] - 1)), "window": window})
    return 0


def cmd_run(args) -> int:
    """The quick start: calibrate (cached), compare fp16 vs KVQuant vs baselines, then generate with the cache."""
    import torch

    from .evaluation.harness import evaluate
    from .evaluation.methods import KIVI, Rotated, UniformPerToken
    from .evaluation.suite import fp16_method, kvquant_methods
    from .models import model_identity
    from .quantizer import QuantizerConfig, default_quantizer_dir

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("[kvquant] quick start: FAST settings (calibration 4 x 1024 tokens, evaluation 4 x 1024 tokens). "
          "The full benchmark (16 x 2048 calibration, >=100k evaluation tokens) is benchmarks/accuracy_smollm2.py.")
    model, tok = _load(args)
    ident = model_identity(model)
    window = _context_window(model, 1024)
    cache = default_quantizer_dir().parent / "stats" / f"{Path(args.model).name}-quick-{window}"
    stats, _ = _stats(args, model, tok, 4, window, (0.0, 0.01), cache=cache)
    methods = [fp16_method()] + kvquant_methods(stats, (4, 3, 2), (0.01,), QuantizerConfig(n_sinks=args.n_sinks),
                                                extras=False)
    methods += [UniformPerToken(4), UniformPerToken(3), UniformPerToken(2), KIVI(4), KIVI(2), Rotated(3, "lloyd")]
    if (ident["num_key_value_heads"] * ident["head_dim"]) % 64 == 0:
        methods.append(UniformPerToken(3, group=64))
    ew = _windows(args, tok, "eval", 4, window)
    rows = evaluate(model, ew, methods)
    args.name = args.name or "quickstart"
    _report(rows, args, Path(args.out), f"Quick start (fast settings): {args.model}",
            {"eval_tokens": int(ew.shape[0] * (ew.shape[1] - 1)), "window": window, "settings": "fast"})
    # Generation with the compressed cache.
    from .calibration import build_quantizer

    q = build_quantizer(stats, QuantizerConfig(bits=3, outlier_fraction=0.01, n_sinks=args.n_sinks))
    q.save(default_quantizer_dir() / f"{Path(args.model).name}-nuq3-1pct")
    try:
        from .generate import generate_text
    except ImportError:
        print("[kvquant] (generation with KVQuantCache is not available in this build)")
        return 0
    print("\n[kvquant] generating with KVQuantCache (nuq3-1%):\n")
    prompt = args.prompt
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    _, report = generate_text(model, tok, prompt, q, max_new_tokens=args.max_new_tokens)
    print()
    print(report)  # MemoryReport: a dict with a readable __str__
    return 0


def cmd_generate(args) -> int:
    from .generate import generate_text
    from .quantizer import load_quantizer

    q = load_quantizer(args.quantizer)  # fail fast, before loading the model
    model, tok = _load(args)
    prompt = args.prompt
    if args.chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    _, report = generate_text(model, tok, prompt, q, max_new_tokens=args.max_new_tokens,
                              recent_window=args.recent_window, sliding_layers=args.sliding_layers)
    print()
    print(report)  # MemoryReport: a dict with a readable __str__
    return 0


def cmd_passkey(args) -> int:
    from .evaluation.passkey import cli_main

    return cli_main(args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvquant", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="calibrate a quantizer artifact (safetensors + JSON)")
    _add_model_text(p)
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=None, help="default: write 2, 3 and 4-bit")
    p.add_argument("--outlier-fraction", type=float, default=0.01)
    p.add_argument("--n-sinks", type=int, default=1)
    p.add_argument("--recent-window", type=int, default=0)
    p.add_argument("--qnorm", action="store_true")
    p.add_argument("--weighting", choices=("fs2", "f", "none"), default="fs2")
    p.add_argument("--value-group", choices=("token", "head"), default="token",
                   help="value ranges and outlier slots per token over all KV heads (default; smallest storage) or per "
                        "head ('head': about 1.4x faster GPU decode attention, fewer outlier passes; "
                        "benchmarks/gpu_decode.md)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity + KL: fp16 vs KVQuant vs baselines on the same windows")
    _add_model_text(p)
    p.add_argument("--quantizer", nargs="*", help="evaluate these quantizers instead of calibrating")
    p.add_argument("--bits-list", type=int, nargs="+", default=[4, 3, 2], choices=(2, 3, 4))
    p.add_argument("--n-sinks", type=int, default=1)
    p.add_argument("--qnorm", action="store_true")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=100_000)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--fast", action="store_true", help="skip the weighting / Q-Norm comparison rows")
    p.add_argument("--out", default="kvquant-results")
    p.add_argument("--name", default="accuracy")
    _add_sliding_layers(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("run", help="the quick start: calibrate, compare, generate (fast settings)")
    _add_model_text(p)
    p.add_argument("--n-sinks", type=int, default=1)
    p.add_argument("--out", default="kvquant-results")
    p.add_argument("--name", default="quickstart")
    p.add_argument("--prompt", default="Write a short paragraph about the history of the telescope.")
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("generate", help="stream text generated with the compressed cache")
    _add_model_text(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--quantizer", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--recent-window", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sliding_layers(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("passkey", help="passkey / needle-in-a-haystack accuracy through generation with each cache")
    _add_model_text(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=50, help="trials per context, split evenly over the depths")
    p.add_argument("--methods", nargs="+", default=None, help="fp16 nuq4 nuq3 nuq2 nuq4-r128 nuq3-r128 nuq2-r128 "
                   "kivi2 kivi4 int4 (default: all)")
    p.add_argument("--task", choices=("passkey", "needle", "both"), default="passkey")
    p.add_argument("--out", default="kvquant-results/passkey", help="output prefix: writes .json, .md and .png")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--calib-window", type=int, default=2048)
    p.add_argument("--stats-dir", default=None, help="calibration statistics cache (default ~/.cache/kvquant/stats)")
    p.add_argument("--batch-size", type=int, default=25, help="prompts per generate call")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--prefill", choices=("exact", "quantized"), default="exact",
                   help="KVQuantCache prefill: the prompt attends itself unquantized (exact) or as stored (quantized)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model/cache dtype for generation (auto: bfloat16 on cuda, float32 on cpu)")
    p.set_defaults(fn=cmd_passkey)

    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kvquant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
