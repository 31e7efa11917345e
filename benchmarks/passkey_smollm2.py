"""Passkey retrieval and needle-in-a-haystack on SmolLM2-135M through real generation with each KV cache.

Writes ``benchmarks/passkey_smollm2.{md,json,png}``. This is ``kvquant passkey`` with the benchmark's defaults; any
option of ``kvquant passkey --help`` may be added and overrides them. The full run is meant for a GPU::

    PYTHONPATH=src python benchmarks/passkey_smollm2.py --device cuda

Defaults: contexts 1K/2K/4K/8K (prompt + generated tokens; 8K is SmolLM2's limit), depths 0/0.25/0.5/0.75/1,
50 trials per context (10 per depth, one batch per cell), the passkey task (``--task both`` adds the needle task
and about doubles the run time), all methods (fp16, KVQuant nuq4/3/2-1% with
R = 0 and 128, KIVI-2/4 and int4 simulated in the cache). KVQuant quantizers are calibrated on 16 x 2048 tokens of
the default corpus's calibration split (statistics cached under ``~/.cache/kvquant/stats``). A quick CPU check::

    PYTHONPATH=src python benchmarks/passkey_smollm2.py --device cpu --contexts 512 1024 --trials 20 \\
        --calib-windows 4 --calib-window 1024 --out /tmp/passkey_cpu
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from kvquant.cli import main  # noqa: E402

DEFAULTS = ["passkey", "--model", "smollm2-135m", "--contexts", "1024", "2048", "4096", "8192", "--depths", "0", "0.25",
            "0.5", "0.75", "1", "--trials", "50", "--task", "passkey", "--out", str(HERE / "passkey_smollm2"),
            "--calib-windows", "16", "--calib-window", "2048"]

if __name__ == "__main__":
    sys.exit(main(DEFAULTS + sys.argv[1:]))
