#!/bin/bash
# Run 142: generate launched eagerly at head_dim 256 (Gemma-3-4B shape, batch 8): natural against pairs on the global layers
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 560 python benchmarks/gpu_suite.py --sections generate --gen-model gemma3-4b --gen-batch 8 \
  --gen-contexts 16384,65536 --gen-eager-pairs-min 200000 \
  --gen-caches kvquant-nuq3-1pct-fused-eager,kvquant-nuq3-1pct-fused-eager-pairs,kvquant-nuq3-1pct-tokengroup-fused-eager,kvquant-nuq3-1pct-tokengroup-fused-eager-pairs \
  --deadline 540 --out $OUT/r 2>&1 | tee $OUT/suite.log | cut -c1-400 | tail -40
ls -R $OUT/r
