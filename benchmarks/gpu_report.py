"""Turn gpu_suite.py's JSON into benchmarks/gpu_decode.{md,json,png}, gpu_capacity.{md,json}, gpu_generate.{md,json}.

    python benchmarks/gpu_report.py PATH/TO/gpu_suite.json [--out benchmarks]
"""

from __future__ import annotations

import argparse
import json
import os


def header(env, title):
    return (f"# {title}\n\nCommand: `{env['command']}`  \n"
            f"GPU: {env['gpu']} ({env['sms']} SMs, {env['memory_gib']} GiB); torch {env['torch']}, "
            f"triton {env['triton']}, python {env['python']}; date {env['date']}.\n\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("suite_json")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    r = json.load(open(a.suite_json))
    env = r["env"]
    out = a.out
    # ---- decode
    dec = {"gpu": env["gpu"], "copy_bandwidth_gbps": r["copy_bandwidth_gbps"], "env": env,
           "rows": r.get("rows", []), "checks": r.get("checks", []), "diag": r.get("diag", []),
           "quantize_append": r.get("quantize_append")}
    json.dump(dec, open(os.path.join(out, "gpu_decode.json"), "w"), indent=1)
    md = header(env, "Decode attention per layer on the H200")
    md += (f"Measured device copy bandwidth: **{r['copy_bandwidth_gbps']} GB/s** (read + write of a 2 GiB copy). "
           "Latency: `triton.testing.do_bench` median (L2 flushed before each call). GB/s = bytes the kernel must read "
           "(fp16: K+V; KVQuant: every quantized field incl. outliers, scales, q_pos, plus the fp16 sink) / time. "
           "Speedup = best fp16 (SDPA flash or our split-K) / this row. Synthetic quantizers (random sorted "
           "codebooks, random per-channel ranges with outlier channels); storages filled through `quantize_append` "
           "on random keys with outlier channels; value outliers per token across KV heads (the default config).\n\n")
    md += "| shape | context | batch | method | impl | bits | latency (us) | GB/s | % copy BW | speedup |\n"
    md += "|---|---|---|---|---|---|---|---|---|---|\n"
    for x in dec["rows"]:
        md += (f"| {x['shape']} | {x['context']} | {x['batch']} | {x['method']} | {x['impl']} | {x['bits']} | "
               f"{x['latency_us']} | {x['gbps']} | {100 * x['bw_fraction']:.1f}% | {x['speedup_vs_best_fp16']}x |\n")
    if dec["checks"]:
        md += "\nCorrectness (relative L2 error vs the float32 PyTorch reference over core.codec):\n\n"
        for c in dec["checks"]:
            md += f"- {c}\n"
    if dec["diag"]:
        md += ("\nDiagnostics (Llama-3-8B, 128K, batch 1, nuq3):\n\n"
               "| value group | outlier fraction | splits | BT | us | GB/s |\n|---|---|---|---|---|---|\n")
        for d in dec["diag"]:
            md += (f"| {d['value_group']} | {d['outlier_fraction']} | {d['num_splits']} | {d['block_t']} | "
                   f"{d['latency_us']} | {d['gbps']} |\n")
    if dec["quantize_append"]:
        md += f"\nquantize_append: {dec['quantize_append']}\n"
    open(os.path.join(out, "gpu_decode.md"), "w").write(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, shape in zip(axes, ("llama3-8b", "llama2-7b")):
            for meth in sorted({(x["method"], x["impl"]) for x in dec["rows"]}):
                pts = sorted((x["context"], x["latency_us"]) for x in dec["rows"]
                             if x["shape"] == shape and x["batch"] == 1 and (x["method"], x["impl"]) == meth)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{meth[0]} ({meth[1]})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{shape}, batch 1, one layer")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode attention latency (us)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "gpu_decode.png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print("no plot:", e)
    # ---- capacity
    cap = r.get("capacity")
    if cap:
        json.dump({"env": env, **cap}, open(os.path.join(out, "gpu_capacity.json"), "w"), indent=1)
        md = header(env, "Capacity: longest context on one H200, Llama-2-7B shape (32 layers, 32 KV heads, d128)")
        md += (f"Budget = {cap['memory_bytes'] / 2**30:.1f} GiB GPU memory - {cap['weights_bytes'] / 1e9:.1f} GB bf16 "
               f"weights - {cap['reserve_bytes'] / 2**30:.0f} GiB workspace. Bytes/token from the real allocated "
               "LayerStorage (all quantized fields, q_pos), x 32 layers.\n\n"
               "| cache | bytes/token | max context |\n|---|---|---|\n")
        for x in cap["rows"]:
            md += f"| {x['cache']} | {x['bytes_per_token']} | {x['max_context']:,} |\n"
        md += f"\n1M-token decode step: {cap.get('decode_1m')}\n"
        open(os.path.join(out, "gpu_capacity.md"), "w").write(md)
    gen = r.get("generate")
    if gen:
        json.dump({"env": env, **gen}, open(os.path.join(out, "gpu_generate.json"), "w"), indent=1)
        md = header(env, "End-to-end decode tokens/s (generate loop)")
        md += (f"Model: {gen['model']}, {gen['layers']} layers, batch 1; {gen['new_tokens']} greedy decode steps after "
               "the prefill, median step time.\n\n| context | cache | tokens/s | step ms | prefill s | peak GiB |\n"
               "|---|---|---|---|---|---|\n")
        for x in gen["rows"]:
            if "error" in x:
                md += f"| {x['context']} | {x['cache']} | error: {x['error'][:120]} | | | |\n"
            else:
                md += (f"| {x['context']} | {x['cache']} | {x['tokens_per_s']} | {x['step_ms']} | {x['prefill_s']} | "
                       f"{x['mem_gib']} |\n")
        open(os.path.join(out, "gpu_generate.md"), "w").write(md)


if __name__ == "__main__":
    main()
