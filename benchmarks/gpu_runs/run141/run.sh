#!/bin/bash
# Run 141: fp16 sliding layers on the GPU (tests + Gemma-3-4B-shaped decode steps with six caches)
export PYTHONPATH=src PYTHONUNBUFFERED=1
git log -1 --format=%h 2>/dev/null > $OUT/commit.txt
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
timeout 330 python benchmarks/gpu_sliding_steps.py --contexts 32768,131072 --steps 40 --out $OUT/r 2>&1 | tee $OUT/sliding.log | grep -v step_ms | cut -c1-600
timeout 230 python -m pytest -v -n 4 tests/test_kernels.py -k "fp16_sliding_layers_gpu or sliding_layers_fused_gpu" --tb=short 2>&1 | tail -25 | tee $OUT/tests.txt
