export PYTHONPATH=src PYTHONUNBUFFERED=1
for shape in gemma3-4b llama3-8b; do
  timeout 100 python benchmarks/gpu_launch_variants.py --shape $shape --batches 1 --rounds 2 --only-merge --reduce-dc 64,8 > $OUT/merge2_$shape.txt 2>&1; echo $shape rc $?
done
timeout 280 python -m pytest -q -n 4 tests/test_kernels.py -k "test_decode_pairs_gpu or test_fp16_decode_gpu or test_decode_pairs_d256_gpu" -rA --tb=short > $OUT/tests.txt 2>&1; echo tests rc $?
grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/tests.txt | tail -8
