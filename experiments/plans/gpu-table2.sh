#!/usr/bin/env bash
# The whole Table 2 of a dataset from scratch on one GPU (issue 17, goal 5), measured: the six teachers trained
# at once (one process each), the GPU benchmark, then the student runs on JOBS processes (16) that take them
# from one queue (`reproduce --jobs`: Ray's local cluster, or local processes where Ray is not installed), all
# sharing the device, then the table assembled from the finished runs. Each phase's wall time goes to
# $OUT/timings.md, the device's load to the dmon log.
#
# A deadline (DEADLINE seconds after the start) stops whatever still trains (SIGTERM: run folders keep their
# last checkpoint), so that the partial table, the timings and the logs still come back; the table then lists
# the runs that are missing. Rerunning with the same WORK folder resumes (finished teachers and runs are reused).
#
# Usage: OUT=<results folder> [DEADLINE=520] [WORK=<folder>] experiments/plans/gpu-table2.sh
# Other knobs (environment): COMMIT (the commit timings.md names; the device copy's git HEAD can be stale), DATA_OPTS (how commands name the data; default "--dataset citeulike"), STUDENTS,
# METHODS, SEEDS, DEVICE (cuda), PYTHON (python3), JOBS (16), BENCH (1: time the hot paths with `hetcomp bench`),
# MPS (1, the default: every process under CUDA's multi-process service, a user-space daemon started here and
# stopped at the end, so the processes' small kernels run side by side instead of time-slicing the device: 5.8×
# the epochs/s of 16 processes without it, gpu-table2-citeulike.md; card settings stay; 0: time-sliced),
# DURATIONS (a table2.csv whose wall times queue the runs longest first; default the committed CiteULike one,
# used where the file exists; order only), STACK (0, the default: one run per process; 1: `reproduce
# --stack-seeds`, the seeds of a run whose method stacks trained as one vmapped model in one process,
# hetcomp/stacked.py. Not the default yet: with 16 processes under MPS it raised the device's seed-epochs/s by
# 1.82x for HetComp and 1.53x for RRD but 1.13x for DCD (gpu-table2-citeulike.md, section 0a); since then every
# method stacks and DCD's and KD's lists are batched over the seeds, which the operator counts put at 1.5-1.9x
# per seed for every method (stacked-seeds.md), unmeasured on a device; a 5-seed task also runs longer than one
# run and could end the table last), STACK_METHODS (with STACK=1, the methods whose seeds stack: `reproduce
# --stack-methods`; default empty: every method that stacks; e.g. none,rrd,hetcomp for the three measured),
# STACK_SIZE (with STACK=1, at most this many seeds a stack: `reproduce --stack-size`; default empty, a row's 5
# seeds in one. A process on a shared device is host-bound: it hardly speeds up when others finish (w/o KD 4.1
# epochs/s alone, 3.6 each of 16 under MPS), so the longest task bounds the table; a 5-seed DNN DCD stack is projected at ~2.3x one such run, which 3 + 2 halves).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT to the folder that receives the results}"
DEADLINE="${DEADLINE:-520}"
DATA_OPTS="${DATA_OPTS:---dataset citeulike}"
STUDENTS="${STUDENTS:-mf,ml,dnn}"
METHODS="${METHODS:-none,rd,rrd,mtd,cl-drd,dcd,kd,hetcomp}"
SEEDS="${SEEDS:-5}"
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python3}"
BENCH="${BENCH:-1}"
MPS="${MPS:-1}"
JOBS="${JOBS:-16}"
STACK="${STACK:-0}"
STACK_METHODS="${STACK_METHODS-}"
STACK_SIZE="${STACK_SIZE:-}"
DURATIONS="${DURATIONS-experiments/results/tuned/citeulike/table2.csv}"
WORK="${WORK:-$(mktemp -d)}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK/logs"
read -r -a data <<< "$DATA_OPTS"
dirs=(--teachers-dir "$WORK/teachers")
start=$(date +%s)

elapsed() { echo $(( $(date +%s) - start )); }
note() { echo "- $(elapsed) s: $*" | tee -a "$OUT/timings.md"; }
hc() { "$PYTHON" -m hetcomp "$@"; }  # foreground only: a background function is a subshell that a stop misses

# wait for the given processes; past the deadline, stop the ones still running (and say which)
wait_or_stop() {
  local pid
  while :; do
    local alive=()
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    if [ "$(elapsed)" -ge "$DEADLINE" ]; then
      note "deadline reached: stopping ${#alive[@]} process(es) still running"
      kill -TERM "${alive[@]}" 2>/dev/null
      sleep 5
      kill -KILL "${alive[@]}" 2>/dev/null
      return 1
    fi
    sleep 2
  done
}

{
  echo "# $DATA_OPTS Table 2 from scratch on $DEVICE"
  echo
  echo "- command: \`OUT=... DEADLINE=$DEADLINE experiments/plans/gpu-table2.sh\` (students $STUDENTS, methods $METHODS, seeds $SEEDS)"
  echo "- commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; started $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $(nproc --all) CPU cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
  echo "- python: $("$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
  echo
} > "$OUT/timings.md"
if [ "$MPS" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    note "CUDA MPS started"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    note "CUDA MPS did not start: the processes time-slice the device"
  fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi dmon -s u -d 5 > "$WORK/logs/dmon.txt" 2>&1 &
dmon=$!

pids=()
for teacher in mf ml dnn gnn ae iae; do
  "$PYTHON" -m hetcomp train-teachers "${data[@]}" --teachers "$teacher" --device "$DEVICE" "${dirs[@]}" \
    > "$WORK/logs/teacher-$teacher.log" 2>&1 &
  pids+=($!)
done
wait_or_stop "${pids[@]}"
note "six teachers trained (one process each, at once)"

if [ "$BENCH" = 1 ] && [ "$(elapsed)" -lt "$DEADLINE" ]; then
  timeout 90 "$PYTHON" -m hetcomp bench "${data[@]}" --device "$DEVICE" "${dirs[@]}" --append "$OUT/bench.md" \
    > "$WORK/logs/bench.log" 2>&1
  note "hetcomp bench (exit $?)"
fi

runs_start=$(elapsed)
order=()
[ -f "$DURATIONS" ] && order=(--durations-from "$DURATIONS")
[ "$STACK" = 1 ] && order+=(--stack-seeds)
[ "$STACK" = 1 ] && [ -n "$STACK_METHODS" ] && order+=(--stack-methods "$STACK_METHODS")
[ "$STACK" = 1 ] && [ -n "$STACK_SIZE" ] && order+=(--stack-size "$STACK_SIZE")
"$PYTHON" -m hetcomp reproduce "${data[@]}" --table 2 --students "$STUDENTS" --methods "$METHODS" --seeds "$SEEDS" \
  --device "$DEVICE" --jobs "$JOBS" "${order[@]}" "${dirs[@]}" --runs-dir "$WORK/runs" \
  --results-dir "$WORK/results" > "$WORK/logs/runs.log" 2>&1 &
note "started the runs: one reproduce, $JOBS processes taking them from one queue (stacked seeds: $STACK, methods: ${STACK_METHODS:-all that stack}, size: ${STACK_SIZE:-a row})"
wait_or_stop $!
note "student runs: $(( $(elapsed) - runs_start )) s of wall time"

hc reproduce "${data[@]}" --table 2 --students "$STUDENTS" --methods "$METHODS" --seeds "$SEEDS" --no-train \
  "${dirs[@]}" --runs-dir "$WORK/runs" --results-dir "$WORK/results" > "$WORK/logs/table.log" 2>&1
note "table assembled from the finished runs (exit $?); $(find "$WORK/runs" -name metrics.json | wc -l) runs finished"
kill "$dmon" 2>/dev/null

table=$(dirname "$(find "$WORK/results" -name table2.csv | head -1)")
for name in table2.csv table2.md manifest.json; do
  [ -f "$table/$name" ] && cp "$table/$name" "$OUT/"
done
(cd "$WORK" && tar czf "$OUT/logs.tar.gz" logs $(find runs -name metrics.json 2>/dev/null) \
  $(find teachers -name '*.json' 2>/dev/null))
note "done"
