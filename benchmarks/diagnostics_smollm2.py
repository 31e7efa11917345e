"""Where the quantization error comes from on SmolLM2: keys only vs values only, more outliers, uniform vs NUQ.

Command (as run for the committed results, on the 2-core CPU):

    PYTHONPATH=src python3 benchmarks/diagnostics_smollm2.py --out benchmarks

A small, quick run (6 x 1024 calibration tokens, 3 x 1024 evaluation tokens): it ranks effects, it does not replace
benchmarks/accuracy_smollm2.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvquant.calibration import CalibrationSettings, build_quantizer, collect_statistics
from kvquant.data import load_default_corpus, make_windows, split_documents
from kvquant.evaluation.harness import evaluate
from kvquant.evaluation.methods import FP16, KVQuantMethod
from kvquant.evaluation.report import environment, markdown_table, write_json
from kvquant.models import load_model
from kvquant.quantizer import QuantizerConfig


class OneSide(KVQuantMethod):
    """KVQuant on keys only or values only (the other side stays unquantized)."""

    def __init__(self, q, side: str, name: str):
        super().__init__(q, name=name)
        self.side = side

    def fake(self, layer, k, v, start, rope):
        kh, vh = super().fake(layer, k, v, start, rope)
        return (kh, v) if self.side == "keys" else (k, vh)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args()
    model, tok = load_model()
    cal, ev = split_documents(load_default_corpus())
    cw, ew = make_windows(tok, cal, 1024, 6), make_windows(tok, ev, 1024, 3)
    stats = collect_statistics(model, cw, CalibrationSettings(outlier_fractions=(0.0, 0.01, 0.02)))
    methods = [FP16()]
    for b in (3, 2):
        q = build_quantizer(stats, QuantizerConfig(bits=b))
        methods += [KVQuantMethod(q, name=f"nuq{b}-1%"), OneSide(q, "keys", f"nuq{b}-1% keys only"),
                    OneSide(q, "values", f"nuq{b}-1% values only"),
                    KVQuantMethod(build_quantizer(stats, QuantizerConfig(bits=b, outlier_fraction=0.02)),
                                  name=f"nuq{b}-2%"),
                    KVQuantMethod(build_quantizer(stats, QuantizerConfig(bits=b, nuq=False)),
                                  name=f"uniform{b}-1% (no k-means)")]
    rows = evaluate(model, ew, methods)
    env = environment()
    doc = {"command": "PYTHONPATH=src python3 benchmarks/diagnostics_smollm2.py", "environment": env,
           "eval_tokens": int(ew.shape[0] * (ew.shape[1] - 1)), "rows": rows}
    out = Path(args.out)
    write_json(doc, out / "diagnostics_smollm2.json")
    md = "\n".join([
        "# Error sources on SmolLM2-135M (quick diagnostic)", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {env['machine']}, device {env['device']}; torch {env['torch']}, transformers "
        f"{env['transformers']}; {env['date']}.  ",
        f"{doc['eval_tokens']} evaluation tokens (3 x 1024), calibration 6 x 1024; 1 fp16 sink. Keys-only / "
        "values-only rows quantize one side and keep the other unquantized; their effective bits are those of the "
        "full row (both sides are encoded, one is discarded).", "",
        markdown_table(rows, rows[0]["ppl"]), ""])
    (out / "diagnostics_smollm2.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
