#!/usr/bin/env bash
# What is left of the fair comparison (every method tuned on validation, then Table 2 at the studies' settings),
# as two one-thread lanes for a 2-core machine: run `fair-comparison.sh citeulike` and `fair-comparison.sh
# foursquare` side by side (e.g. under nohup). Every step resumes where it stopped: finished teachers are skipped,
# studies go on from their committed trials records, finished runs are reused; stop with SIGTERM (not SIGSTOP:
# Ray kills a stopped worker) and rerun the same lane to continue. Needs $HETCOMP_DATA.
#
# The teachers are trained exactly as the committed studies' were (their digests and thread counts are on
# experiments/results/teachers-<dataset>.md; `hetcomp tune` refuses trials made with other teachers). They
# reproduce only on a CPU whose instruction set the earlier machines had: on 2026-12-04 a 2-core AMD EPYC with AVX2
# gave the Foursquare ae and iae teachers other rankings (same state epochs, test R@50 equal to 4 digits; digest
# 2cd1686186e0 instead of ca11f4a661d8) and the lane stopped at `tune`, naming the digests. The machine line of
# every result now names the CPU model and torch's kernel level (e.g. "AMD EPYC, AVX2").
#
# The Foursquare lane that gave the table (2026-12-05) ran on the teachers 2-core AVX2 machines with torch
# 2.13.0+cpu give (digest 2cd1686186e0), first in experiments/tuning-2cd1686186e0 and
# experiments/results/tuned-2cd1686186e0, then moved to experiments/tuning/foursquare and
# experiments/results/tuned/foursquare, replacing the first lane (teachers ca11f4a661d8, stopped at 50 of its 72
# rows; its studies and rows are in git history before that move). Its studies were made before a study that goes
# on retried its moved start points; they were then extended to try them (MF RD, RRD, MTD, CL-DRD and KD to 17
# trials, ML and DNN RD to 10; no choice changed). Run today, the 16-trial step below tries them within 16.
# Cost: ~25 h single-thread for studies and rows.
#
# JOBS=2 runs two studies (then two runs) at once, one thread each: for one lane alone on the machine, e.g. the
# Foursquare lane once the CiteULike one is done (stop it with SIGTERM and start it again with JOBS=2).
#
# For the two cl-drd-full cases, `python experiments/plans/lanes.py` (once per core) runs the same steps of both
# datasets in the order their prerequisites allow, each worker taking the next useful one.
#
# A lane runs for hours: start it from a checkout nobody edits meanwhile (a second clone or a `git worktree`,
# whose records are then committed from there). Training refuses to start once the sources under it changed
# (Ray's workers import modules lazily, so an edited checkout would otherwise mix two versions of the code);
# rerunning the lane resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
# Table 2's methods in its column order (CL-DRD is cl-drd-full, the form the HetComp paper ran) and the option row
# CL-DRD (sampled), cl-drd. `--method all` is every registered method, cl-drd-full included (hours a study).
METHODS=none,rd,rrd,mtd,cl-drd-full,dcd,kd,hetcomp,cl-drd
JOBS="${JOBS:-1}"

case "${1:-}" in
citeulike)
  hetcomp train-teachers --dataset citeulike --teachers mf,ml,dnn,gnn,ae --threads 1
  OMP_NUM_THREADS=2 hetcomp train-teachers --dataset citeulike --teachers iae --threads 2
  hetcomp tune --dataset citeulike --student ml,dnn --method all --trials 8 --jobs "$JOBS" --threads 1
  hetcomp reproduce --dataset citeulike --table 2 --students mf,ml,dnn --seeds 5 --methods "$METHODS" \
    --results-dir experiments/results/tuned --jobs "$JOBS"
  ;;
foursquare)
  hetcomp train-teachers --dataset foursquare --threads 1
  hetcomp tune --dataset foursquare --student mf,ml,dnn --method all --trials 8 --jobs "$JOBS" --threads 1
  # the MF student's studies to 16 trials each, as CiteULike's MF studies: at 8, RD and CL-DRD (sampled) never reached the
  # small weights where they beat w/o KD on validation (tuned/foursquare/rd-cl-drd-small-weights.md)
  hetcomp tune --dataset foursquare --student mf --method all --trials 16 --jobs "$JOBS" --threads 1
  hetcomp reproduce --dataset foursquare --table 2 --students mf,ml,dnn --seeds 3 --methods "$METHODS" \
    --results-dir experiments/results/tuned --jobs "$JOBS"
  ;;
foursquare-cl-drd-full)
  # CL-DRD as the HetComp paper ran it (--method cl-drd-full), Foursquare's three students, then their rows: the
  # table's CL-DRD row (the sampled form's MF row trails w/o KD). ~12 s an epoch per one-thread worker
  # (bench.md, 2026-12-05 seventh session), so a trial is 20 min to 1.5 h and the MF study most of a day of one core. Start this case
  # twice (once the first has begun to tune, the teachers trained): one worker per core, both on each study's one
  # SQLite file in turn (MF, then ML, then DNN, whose first trials read MF's choice), then both on the rows
  # (side-by-side reproduce calls share the ledger). Every step resumes. On an AVX-512 CPU the kernels are held
  # at AVX2, which gives the table's teachers (2cd1686186e0, teachers-foursquare-notes.md) and trains as the AVX2
  # machines did.
  if [ "$(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" = AVX512 ]; then
    export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
  fi
  hetcomp train-teachers --dataset foursquare --threads 1
  hetcomp tune --dataset foursquare --student mf --method cl-drd-full --trials 16 --threads 1
  hetcomp tune --dataset foursquare --student ml --method cl-drd-full --trials 8 --threads 1
  hetcomp tune --dataset foursquare --student dnn --method cl-drd-full --trials 8 --threads 1
  hetcomp reproduce --dataset foursquare --table 2 --students mf,ml,dnn --seeds 3 --methods "$METHODS" \
    --results-dir experiments/results/tuned
  ;;
citeulike-cl-drd-full)
  # The same for CiteULike (its sampled CL-DRD rows are above w/o KD; this gives the table the form the HetComp
  # paper ran): ~13 s an epoch per one-thread worker (bench.md, 2026-12-05 sixth session), 16 + 8 + 8 trials and
  # 15 rows, about two days of one core. Two lanes as above; the CiteULike teachers as the `citeulike` case trains
  # them (their digest 4fef07d28b12 reproduced natively on AVX-512).
  hetcomp train-teachers --dataset citeulike --teachers mf,ml,dnn,gnn,ae --threads 1
  OMP_NUM_THREADS=2 hetcomp train-teachers --dataset citeulike --teachers iae --threads 2
  hetcomp tune --dataset citeulike --student mf --method cl-drd-full --trials 16 --threads 1
  hetcomp tune --dataset citeulike --student ml --method cl-drd-full --trials 8 --threads 1
  hetcomp tune --dataset citeulike --student dnn --method cl-drd-full --trials 8 --threads 1
  hetcomp reproduce --dataset citeulike --table 2 --students mf,ml,dnn --seeds 5 --methods "$METHODS" \
    --results-dir experiments/results/tuned
  ;;
*)
  echo "usage: $0 citeulike|foursquare|foursquare-cl-drd-full|citeulike-cl-drd-full   (one lane per core; see the comment at the top)" >&2
  exit 2
  ;;
esac
