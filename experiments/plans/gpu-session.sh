#!/usr/bin/env bash
# One call for a lent GPU (15 minutes of device time per session, a start included): what issue 17's goal 5
# still needs measured, most informative first, every part bounded so the files still come back.
#  1. the sharing test under CUDA MPS (experiments/plans/gpu_overhead.py --mps, ~1 min);
#  2. stacked seeds on the device (experiments/plans/replica_prototype.py, ~1 min);
#  3. the whole CiteULike Table 2 from scratch under MPS until the deadline (experiments/plans/gpu-table2.sh).
# Needs the shared CiteULike file under ./datasets (carry it: `datasets`) and $OUT.
# Usage (device tool): export HETCOMP_DATA=$PWD/datasets HETCOMP_CACHE=$PWD/datasets/cache PYTHONPATH=$PWD;
#   OUT=$OUT TOTAL=540 experiments/plans/gpu-session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT}"
TOTAL="${TOTAL:-540}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
timeout 100 python3 experiments/plans/gpu_overhead.py --mps --deadline 70 2>&1 | grep -v USDT | tail -8
timeout 100 python3 experiments/plans/replica_prototype.py --epochs 3 2>&1 | tail -5
left=$(( TOTAL - ($(date +%s) - start) - 30 ))
MPS=1 DEADLINE="$left" experiments/plans/gpu-table2.sh
