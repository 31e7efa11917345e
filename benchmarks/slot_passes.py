"""How many slot passes a 32-token block of token-group values costs the pairs kernel (CPU, no GPU needed): the
per-KV-head run lengths of the value slots (core.codec.head_ends) in storages filled like gpu_suite.py's (synthetic
codec and keys/values, nuq3-1%), and the per-block maximum over 32 tokens, which is the number of slot passes
(the merge passes of the sixth session, the tile's scatter passes since the seventh; benchmarks/gpu_notes.md).

    PYTHONPATH=src python benchmarks/slot_passes.py [--heads 8,32] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from kvquant.cache.storage import LayerStorage
from kvquant.kernels.testing import synthetic_codec, synthetic_kv, synthetic_rope


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="8,32", help="KV heads (8: Llama-3-8B shape, 32: Llama-2-7B)")
    ap.add_argument("--tokens", type=int, default=8192)
    a = ap.parse_args()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, "
          f"torch {torch.__version__}; {platform.machine()} CPU (the count does not depend on the machine); "
          f"command: PYTHONPATH=src python benchmarks/slot_passes.py --heads {a.heads} "
          f"--tokens {a.tokens}")
    D, T = 128, a.tokens
    for H in (int(h) for h in a.heads.split(",")):
        codec = synthetic_codec(H, D, 3, 0.01, "token", seed=3)
        rope = synthetic_rope(D, base=500000.0)
        st = LayerStorage(codec, rope, 0, 0, 1, torch.bfloat16, "cpu")
        pos = torch.arange(T)[None, :]
        k, v = synthetic_kv(codec, rope, 1, T, pos, seed=0)
        st.append_quantized(k, v, pos)
        ends = st.v_out_ends[0, 0, :T].long()  # [T, H]
        runs = ends - torch.cat([torch.zeros(T, 1, dtype=torch.long), ends[:, :-1]], 1)
        passes = runs[: T // 32 * 32].view(-1, 32, H).amax(1)  # [blocks, H]
        hist = torch.bincount(passes.flatten()).tolist()
        print(f"{H} KV heads: {st.v_out_idx.shape[-1]} slots per token, {runs.float().mean():.2f} per head on "
              f"average; passes per block {passes.float().mean():.2f} on average, histogram {hist}; with two ranks "
              f"per pass (34ff711, reverted) {(2 * ((passes + 1) // 2)).float().mean():.2f} ranks per block")


if __name__ == "__main__":
    main()
