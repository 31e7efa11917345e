export PYTHONPATH=src PYTHONUNBUFFERED=1
date -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 200 python benchmarks/gpu_pairs_probe.py --shape gemma3-4b --contexts 1024,4096,8192,16384,24576 --batches 1,8 --groups head --bits 3 > $OUT/probe_nuq3.txt 2>&1; echo probe3 rc $?
timeout 150 python benchmarks/gpu_pairs_probe.py --shape gemma3-4b --contexts 1024,4096,8192,16384,24576 --batches 1,8 --groups head --bits 2 > $OUT/probe_nuq2.txt 2>&1; echo probe2 rc $?
for spec in "--group token --bits 3" "--group head --bits 2" "--group head --bits 4"; do
  n=$(echo $spec | tr -d ' -'); timeout 100 python benchmarks/gpu_launch_variants.py --shape gemma3-4b --batches 1 --rounds 1 $spec > $OUT/variants_$n.txt 2>&1; echo variants $n rc $?
done
date -u
