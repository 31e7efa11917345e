export PYTHONPATH=src PYTHONUNBUFFERED=1
date -u
for shape in gemma3-4b llama3-8b; do
  timeout 200 python benchmarks/gpu_launch_variants.py --shape $shape --batches 1,8 --rounds 2 --only-merge --reduce-dc 32,16 > $OUT/merge_$shape.txt 2>&1; echo $shape rc $?
done
date -u
