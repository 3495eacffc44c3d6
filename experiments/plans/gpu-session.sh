#!/usr/bin/env bash
# One call for a lent GPU (15 minutes of device time per session, a start included): what issue 17's goal 5
# needs measured next, every part bounded so that the files still come back.
#  1. the six CiteULike teachers at once on the GPU (~70 s under no MPS; needed by 2 and 3);
#  2. `hetcomp bench --device cuda` (BENCH_METHODS): each method's ordinary epoch and its 5 seeds stacked
#     (hetcomp/stacked.py), per seed;
#  3. experiments/plans/stacked_share.py: 16 processes under CUDA MPS, each one ordinary run or 5 stacked seeds
#     of each of SHARE_METHODS: seed-epochs/s of the whole device, the factor the table's projection divides by
#     (gpu-table2-citeulike.md, sections 0 and 0a). HetComp, RRD and w/o KD were measured (1.82x, 1.53x, 1.65x);
#     the defaults are the methods not measured since their lists were batched over the seeds, whose operators per
#     seed predict (CiteULike MF, experiments/plans/step_ops.py) DCD 2.0x, KD 2.2x, CL-DRD 2.5x, MTD 1.7x,
#     RD 1.6x.
#  4. (FS_CPU=1) on the machine's CPU, beside 1-3: the Foursquare user and item autoencoders with one thread each,
#     as the committed Foursquare teachers were made (teachers-foursquare.md: 4e96f83fbebc, 54e779961613), which a
#     2-core AVX2 machine does not reproduce (teachers-foursquare-notes.md): their digests, and their trajectories
#     back as $OUT/fs-<teacher>.tgz where they match, for issue 19's Foursquare lane; and the user autoencoder once
#     more with torch's and MKL's kernels held at AVX2 (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA), whose
#     digest, against the AVX2 machine's bf66b4a4de31, says whether pinning the kernel level makes teachers portable.
#  5. (CLDRD_UNSAMPLED=1, the default) CL-DRD as the HetComp paper ran it (`--method cl-drd-full`: LambdaMRR of the
#     ensemble's list against every unobserved item) on the MF student, 4 epochs: its seconds an epoch on the
#     device, which say whether its studies (issue 19: the sampled form's rows trail w/o KD on Foursquare's MF
#     student and sit -34 % from the paper on CiteULike) fit GPU sessions; ~12 s an epoch on one CPU thread.
# The whole table (gpu-table2.sh) is not run: it cannot finish in one call, and its pace is measured.
# Needs the shared CiteULike file under ./datasets (carry it: `datasets`; for 4, Foursquare's files under
# datasets/foursquare_fgcrec) and $OUT.
# Knobs (environment): BENCH_METHODS (2; default dcd,kd; empty: skip 2), SHARE_METHODS (3; default
# dcd,kd,cl-drd,rd,mtd, the largest shares of the projected table first: rows past the deadline are skipped; empty:
# skip 3), SHARE_REPLICAS (1,5), SHARE_OPTIONS (3's `--option METHOD.NAME=VALUE`s,
# space-separated; default the CiteULike studies' choices that shape a step: KD's listwise menu (with it KD
# stacks), its list and own weight, RD's dynamic weighting), TEACHERS_XZ (a folder of <dataset>/<teacher>/
# trajectory.npz.xz made here, carried: the teachers unpacked instead of trained in 1, which saves ~70-130 s of
# device time; their digests need not be the studies'), DEVICE (cuda; cpu to try the script out), COMMIT (the
# commit timings.md names: the device copy's git HEAD can be stale, so pass this checkout's short sha).
# Usage (device tool): export HETCOMP_DATA=$PWD/datasets HETCOMP_CACHE=$PWD/datasets/cache PYTHONPATH=$PWD;
#   OUT=$OUT TOTAL=540 experiments/plans/gpu-session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:?set OUT}"
TOTAL="${TOTAL:-540}"
BENCH_METHODS="${BENCH_METHODS-dcd,kd}"
SHARE_METHODS="${SHARE_METHODS-dcd,kd,cl-drd,rd,mtd}"
SHARE_REPLICAS="${SHARE_REPLICAS:-1,5}"
read -r -a share_options <<< "${SHARE_OPTIONS-kd.losses=listwise:1.0 kd.own_weight=0.1 kd.k=68 rd.dynamic=true}"
TEACHERS_XZ="${TEACHERS_XZ:-}"
DEVICE="${DEVICE:-cuda}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
WORK="$(mktemp -d)"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
note() { echo "- $(elapsed) s: $*" | tee -a "$OUT/timings.md"; }
{
  echo "# GPU session: stacked seeds on the device"
  echo
  echo "- commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}; started $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $(nproc --all) CPU cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
  echo "- CPU: $(python3 -c 'from hetcomp.provenance import machine; print(machine())' 2>&1 | tail -1);" \
    "AVX-512 flags: $(grep -o 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo
} > "$OUT/timings.md"

FS_CPU="${FS_CPU:-0}"
cpu_pids=()
if [ "$FS_CPU" = 1 ]; then  # part 4, beside the GPU's parts: one CPU thread each
  for teacher in ae iae; do
    timeout $(( TOTAL - 40 )) python3 -m hetcomp train-teachers --dataset foursquare --teachers "$teacher" \
      --threads 1 --device cpu --teachers-dir "$WORK/fs" > "$WORK/fs-$teacher.log" 2>&1 &
    cpu_pids+=($!)
  done
  ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 timeout $(( TOTAL - 40 )) python3 -m hetcomp \
    train-teachers --dataset foursquare --teachers ae --threads 1 --device cpu --teachers-dir "$WORK/fs-avx2" \
    > "$WORK/fs-ae-avx2.log" 2>&1 &
  cpu_pids+=($!)
fi

pids=()
if [ -n "$TEACHERS_XZ" ]; then
  (cd "$TEACHERS_XZ" && find . -name trajectory.npz.xz) | while read -r packed; do
    mkdir -p "$WORK/teachers/$(dirname "$packed")"
    xz -dc "$TEACHERS_XZ/$packed" > "$WORK/teachers/${packed%.xz}" &
  done
  wait
  note "teachers unpacked from $TEACHERS_XZ: $(find "$WORK/teachers" -name trajectory.npz | wc -l) trajectories"
else
  for teacher in mf ml dnn gnn ae iae; do
    timeout 200 python3 -m hetcomp train-teachers --dataset citeulike --teachers "$teacher" --device "$DEVICE" \
      --teachers-dir "$WORK/teachers" > "$WORK/teacher-$teacher.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  note "six teachers trained at once"
fi

if [ -n "$BENCH_METHODS" ]; then
  timeout 150 python3 -m hetcomp bench --dataset citeulike --device "$DEVICE" --teachers-dir "$WORK/teachers" \
    --methods "$BENCH_METHODS" --append "$OUT/bench.md" > "$WORK/bench.log" 2>&1
  note "hetcomp bench (exit $?)"
fi

if [ "${CLDRD_UNSAMPLED:-1}" = 1 ]; then  # part 5: epochs 3-4 less epochs 1-2 (one evaluation each) over two
  timeout 150 python3 -m hetcomp distill --dataset citeulike --student mf --dim 6 --method cl-drd-full \
    --max-epochs 4 --eval-every 2 --device "$DEVICE" --teachers-dir "$WORK/teachers" \
    --runs-dir "$WORK/cl-drd-runs" > "$WORK/cl-drd.log" 2>&1
  status=$?
  note "CL-DRD without sampling, MF, CiteULike (exit $status): $(python3 -c '
import json, pathlib, sys
history = [json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).rglob("history.json")]
points = {point["epoch"]: point["seconds"] for point in history[0]} if history else {}
print(f"{(points[4] - points[2]) / 2:.2f} s an epoch (epochs 3-4, with one evaluation)" if {2, 4} <= set(points)
      else f"no timing: evaluations at {sorted(points)}")
' "$WORK/cl-drd-runs" 2>&1 | tail -1)"
  [ "$status" = 0 ] || tail -5 "$WORK/cl-drd.log"
fi

cpu_busy() { local pid; for pid in "${cpu_pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
while [ "$(elapsed)" -lt 260 ] && cpu_busy; do
  sleep 2  # the CPU teachers first where they end soon: 16 processes follow, one per core
done
cpu_busy && note "the Foursquare CPU teachers still train beside what follows"
left=$(( TOTAL - $(elapsed) - 30 ))
if [ -n "$SHARE_METHODS" ]; then
  OUT="$OUT" timeout "$left" python3 experiments/plans/stacked_share.py --dataset citeulike --device "$DEVICE" \
    --teachers-dir "$WORK/teachers" --methods "$SHARE_METHODS" --replicas "$SHARE_REPLICAS" --share 16 --mps \
    --epochs 3 --deadline $(( left - 70 )) "${share_options[@]/#/--option=}" 2>&1 | grep -v USDT | tail -6
  note "stacked_share (exit ${PIPESTATUS[0]})"
fi
[ -f "$WORK/bench.log" ] && tail -20 "$WORK/bench.log"
if [ "$FS_CPU" = 1 ]; then
  wait "${cpu_pids[@]}"
  for folder in "$WORK"/fs/foursquare/{ae,iae} "$WORK"/fs-avx2/foursquare/ae; do
    note "$folder: $(python3 -c '
import sys
from hetcomp.runs.spec import trajectory_digest
from hetcomp.trajectory import load_trajectory
t = load_trajectory(sys.argv[1] + "/trajectory.npz")
t.meta["name"] = t.meta["teacher"]
print("digest", trajectory_digest(t)[:12], "state epochs", t.meta["state_epochs"], "train s", t.meta["train_seconds"])
' "$folder" 2>&1 | tail -1)"
  done
  for teacher in ae iae; do
    folder="$WORK/fs/foursquare/$teacher"
    [ -f "$folder/trajectory.npz" ] && tar czf "$OUT/fs-$teacher.tgz" -C "$WORK/fs" \
      "foursquare/$teacher/trajectory.npz" "foursquare/$teacher/config.json" "foursquare/$teacher/history.json"
  done
  note "Foursquare autoencoders packed: $(ls "$OUT"/fs-*.tgz 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
fi
