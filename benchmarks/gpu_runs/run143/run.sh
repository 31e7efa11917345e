#!/bin/bash
# Run 143: the eager head_dim-256 GPU tests, then the decode matrix on the final kernels (REDUCE_DC = 16)
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 100 python -m pytest -v -n 4 tests/test_kernels.py -k "eager_pairs_steps_match_natural_gpu" --tb=short 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error" | tee $OUT/tests.txt
timeout 470 python benchmarks/gpu_suite.py --sections bw,decode --shapes llama3-8b,llama2-7b,gemma3-4b --deadline 455 --out $OUT/suite > $OUT/suite.log 2>&1
tail -5 $OUT/suite.log
