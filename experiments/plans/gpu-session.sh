#!/usr/bin/env bash
# One call for a lent GPU (15 minutes of device time per session, a start included): what issue 17's goal 5
# needs measured next, every part bounded so that the files still come back.
#  1. the six CiteULike teachers at once on the GPU (~70 s under no MPS; needed by 2 and 3);
#  2. `hetcomp bench --device cuda` for w/o KD, RRD, DCD and HetComp: each method's ordinary epoch and its
#     5 seeds stacked (hetcomp/stacked.py), per seed;
#  3. experiments/plans/stacked_share.py: 16 processes under CUDA MPS, each one ordinary run or 5 stacked seeds
#     of HetComp, then of RRD, then of w/o KD: seed-epochs/s of the whole device, the factor the table's
#     projection divides by (22-36 minutes with one run per process, gpu-table2-citeulike.md, section 0). The
#     operators each step dispatches per seed predict 1.6x (HetComp MF), 1.6x (RRD MF) and 1.6-1.9x (w/o KD,
#     whose prototype measured 1.65x): experiments/plans/step_ops.py; this checks that model of a host-bound GPU.
# The whole table (gpu-table2.sh) is not run: it cannot finish in one call, and its pace is measured.
# Needs the shared CiteULike file under ./datasets (carry it: `datasets`) and $OUT.
# Usage (device tool): export HETCOMP_DATA=$PWD/datasets HETCOMP_CACHE=$PWD/datasets/cache PYTHONPATH=$PWD;
#   OUT=$OUT TOTAL=540 experiments/plans/gpu-session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT}"
TOTAL="${TOTAL:-540}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
WORK="$(mktemp -d)"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
note() { echo "- $(elapsed) s: $*" | tee -a "$OUT/timings.md"; }
{
  echo "# GPU session: stacked seeds on the device"
  echo
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); started $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $(nproc --all) CPU cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
  echo
} > "$OUT/timings.md"

pids=()
for teacher in mf ml dnn gnn ae iae; do
  timeout 200 python3 -m hetcomp train-teachers --dataset citeulike --teachers "$teacher" --device cuda \
    --teachers-dir "$WORK/teachers" > "$WORK/teacher-$teacher.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
note "six teachers trained at once"

timeout 150 python3 -m hetcomp bench --dataset citeulike --device cuda --teachers-dir "$WORK/teachers" \
  --methods none,rrd,dcd,hetcomp --append "$OUT/bench.md" > "$WORK/bench.log" 2>&1
note "hetcomp bench (exit $?)"

left=$(( TOTAL - $(elapsed) - 20 ))
OUT="$OUT" timeout "$left" python3 experiments/plans/stacked_share.py --dataset citeulike \
  --teachers-dir "$WORK/teachers" --methods hetcomp,rrd,none --replicas 1,5 --share 16 --mps --epochs 3 \
  --deadline $(( left - 100 )) 2>&1 | grep -v USDT | tail -6
note "stacked_share (exit ${PIPESTATUS[0]})"
tail -20 "$WORK/bench.log"
