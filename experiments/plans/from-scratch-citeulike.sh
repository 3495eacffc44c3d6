#!/usr/bin/env bash
# Issue 17, goal 4 and its acceptance: CiteULike's whole Table 2 (six teachers, 3 students x 8 methods x 5 seeds)
# trained from empty folders by one `reproduce` command, its wall time measured by that command. The table takes
# longer than a session here, so the command is simply rerun in the next one: finished teachers and runs are
# reused, a run stopped midway resumes from its checkpoint, and the clock in the results folder
# (from-scratch-clock.json) adds each call's wall time until the call that finishes the last cell writes the total
# to manifest.json's from_scratch_measured (hetcomp/paper/clock.py).
#
# Run it from a checkout that nobody edits while it runs (e.g. `git worktree add /work/scratch/code <commit>`),
# with PYTHONPATH at that checkout so that the Ray workers import the same code, and in the background:
#   cd /work/scratch/code && PYTHONPATH=$PWD HETCOMP_DATA=/work/shared/data/raw \
#     nohup experiments/plans/from-scratch-citeulike.sh > /work/logs/scratch-cu.log 2>&1 &
# Nothing else should run on the machine meanwhile: the figure is the table's cost on it.
# On an Intel CPU the command runs under `python -m hetcomp.mkl_as_amd` so that MKL computes as on the AMD machines
# that trained the committed teachers and rows (the table is meant to give those rows bit for bit).
set -euo pipefail
ROOT=${SCRATCH:-/work/scratch}
cd "$(dirname "$0")/../.."
HETCOMP=(python -m hetcomp)
if grep -q GenuineIntel /proc/cpuinfo; then HETCOMP=(python -m hetcomp.mkl_as_amd hetcomp); fi
exec "${HETCOMP[@]}" reproduce --dataset citeulike --table 2 --students mf,ml,dnn --seeds 5 \
  --teachers-dir "$ROOT/teachers" --runs-dir "$ROOT/runs" --results-dir "$ROOT/results" --jobs 2 \
  --durations-from experiments/results/tuned/citeulike/table2.csv
