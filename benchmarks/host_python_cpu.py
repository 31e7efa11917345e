"""Python-side host cost of one layer's decode pieces, with the Triton launches stubbed out (CPU, no GPU needed).

    python benchmarks/host_python_cpu.py [--label NAME] [--out benchmarks/host_python_cpu.json]

Runs on whatever ``kvquant`` is importable (set PYTHONPATH to an export of another commit's ``src`` to compare
versions) and appends one labelled row to --out. The kernels' launch objects are replaced by no-ops, so the timings
are the Python around the launches only: the decode_attention call (without and with a 4-D mask) and one steady
storage append (R = 0, Llama-3-8B head shape, bf16, 300 tokens held), and one replayed CUDA-graph step
(kernels.graphs: append + attention, with a no-op replay; its four input copies are CPU copies here). The launches
themselves are timed on the GPU by gpu_host_profile.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["KVQUANT_FUSED_DECODE"] = "1"

import torch  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(20):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="working tree")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "host_python_cpu.json"))
    a = ap.parse_args()
    import kvquant
    from kvquant import kernels
    from kvquant.cache.storage import LayerStorage
    from kvquant.kernels import _triton as K
    from kvquant.kernels.testing import synthetic_codec, synthetic_kv, synthetic_rope

    B, H, Hq, D = 1, 8, 32, 128
    codec = synthetic_codec(H, D, 3, 0.01, "head", seed=1)
    rope = synthetic_rope(D)
    st = LayerStorage(codec, rope, 1, 0, B, torch.bfloat16, "cpu", initial_capacity=4096)
    k, v = synthetic_kv(codec, rope, B, 300, torch.arange(300)[None], dtype=torch.bfloat16, seed=2)
    st.append(k, v, torch.arange(300)[None])  # real kernels (interpreter) fill the storage

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for name in ("_kvq_decode_fields_kernel", "_kvq_decode_kernel", "_reduce_kernel", "_quant_kv_kernel"):
        setattr(K, name, NoLaunch())
    q = torch.randn(B, Hq, 1, D, dtype=torch.bfloat16)
    k1, pos = k[:, :, :1].contiguous(), torch.tensor([[300]])
    mask = torch.ones(1, 1, 1, len(st) + 2, dtype=torch.bool)
    n0 = st.n_q

    def append():
        st.append(k1, k1, pos)
        st.n_q = n0

    graph_us = None
    try:  # the graph step (kernels.graphs, since 5aefcfb): the capture replaced by an object with a no-op replay
        from kvquant.kernels import graphs

        class NoReplay:
            def replay(self):
                pass

        graphs._on_cuda = lambda storage: True
        graphs.LayerDecodeGraph._capture = staticmethod(lambda storage, fn: NoReplay())
        gr = graphs.LayerDecodeGraph()
        gr.step(st, k1, k1, pos, q, 0.08)  # records (the eager body with stubbed launches)

        def graph_step():
            gr.step(st, k1, k1, pos, q, 0.08)
            st.n_q, st.n_seen = n0, st.n_seen - 1
            gr.dev_n_q = n0  # what a replay would have left on the device

        st.n_q = n0
        gr.dev_n_q = n0
        graph_us = round(per_call_us(graph_step), 1)
    except ImportError:  # an older kvquant without kernels.graphs
        pass
    row = {
        "label": a.label, "kvquant_file": kvquant.__file__, "graph_step_us": graph_us,
        "decode_attention_us": round(per_call_us(lambda: kernels.decode_attention(q, st, 0.08)), 1),
        "decode_attention_mask4d_us": round(per_call_us(lambda: kernels.decode_attention(q, st, 0.08, mask)), 1),
        "append_steady_us": round(per_call_us(append), 1),
        "env": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "command": "python benchmarks/host_python_cpu.py " + " ".join(sys.argv[1:]),
                "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip()},
    }
    rows = json.load(open(a.out)) if os.path.exists(a.out) else []
    rows.append(row)
    json.dump(rows, open(a.out, "w"), indent=1)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
