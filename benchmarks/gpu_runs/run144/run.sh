#!/bin/bash
# Run 144: the GPU test suite on the final code, as far as the session's remaining device time goes
export PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 225 python -m pytest -m gpu -v -n 4 tests/ --tb=line -p no:cacheprovider 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|error" | tee $OUT/tests.txt | tail -70
