#!/usr/bin/env bash
# The real-data CPU protocol (README, "Real data: Kvasir-SEG"): every method against its own --strategy random
# on the full Kvasir-SEG, one shared schedule, 3 seeds, then the ceiling (--strategy full: the same model on the
# whole training pool for the active-learning run's optimiser steps). Runs JOBS scripts at a time, one thread
# each; a run cut short continues with `python SCRIPT.py --resume RUN_DIR`.
#   bash benchmarks/sweep_kvasir.sh KVASIR_DIR OUT [JOBS] [PART] [ONLY]
#   JOBS: 2 by default; PART: al, full or all (default); ONLY: an extended regular expression the run lines must
#   match, e.g. 'ssl_coldstart|dsal_fingerbones' (default: every script)
set -u
DATA=${1:?usage: bash benchmarks/sweep_kvasir.sh KVASIR_DIR OUT [JOBS] [al|full|all] [ONLY]}; OUT=${2:?OUT folder}
JOBS=${3:-2}; PART=${4:-all}; ONLY=${5:-.}
C="--data kvasir-seg --data-dir $DATA --split 320 80 200 --image-size 64 --width 16 --batch-size 16
   --initial 40 --query 20 --rounds 5 --epochs-initial 30 --epochs 5 --device cpu --out $OUT"
SSL="--ssl-epochs 6 --shuffle-blocks 1000"
{
for seed in 0 1 2; do
  if [ "$PART" != full ]; then
    echo "ceal_mcdropout.py --lr 1e-3 --mc-passes 5 --pseudo-step 5 --strategy ceal --seed $seed"
    echo "ceal_mcdropout.py --lr 1e-3 --strategy random --seed $seed"
    echo "ssl_coldstart.py --lr 1e-3 $SSL --strategy cluster --seed $seed"
    echo "ssl_coldstart.py --lr 1e-3 $SSL --strategy random --seed $seed"
    echo "region_uncertainty.py --lr 0.01 --strategy least-confidence --seed $seed"
    echo "region_uncertainty.py --lr 0.01 --strategy random --seed $seed"
    echo "polyp_weighted_cluster.py --lr 1e-3 --strategy ours --seed $seed"
    echo "polyp_weighted_cluster.py --lr 1e-3 --strategy random --seed $seed"
    echo "dsal_fingerbones.py --lr 1e-3 --strategy dsal --seed $seed"
    echo "dsal_fingerbones.py --lr 1e-3 --strategy random --seed $seed"
    echo "example_tta.py --lr 1e-3 --strategy tta --seed $seed"
    echo "example_tta.py --lr 1e-3 --strategy random --seed $seed"
    echo "example_claspe.py --lr 1e-3 --strategy claspe --seed $seed"
    echo "example_claspe.py --lr 1e-3 --strategy random --seed $seed"
  fi
  if [ "$PART" != al ]; then
    for s in "ceal_mcdropout.py --lr 1e-3" "ssl_coldstart.py --lr 1e-3 $SSL" "region_uncertainty.py --lr 0.01" \
             "polyp_weighted_cluster.py --lr 1e-3" "dsal_fingerbones.py --lr 1e-3" "example_tta.py --lr 1e-3" \
             "example_claspe.py --lr 1e-3"; do
      echo "$s --strategy full --seed $seed"
    done
  fi
done
} | grep -E -- "$ONLY" | xargs -P "$JOBS" -I{} bash -c 'a=$(date +%s); OMP_NUM_THREADS=1 python {} '"$(echo $C)"' > /dev/null 2> >(tail -3 >&2); \
   echo "rc=$? $(( $(date +%s) - a ))s | {}"'
