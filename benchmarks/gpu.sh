#!/usr/bin/env bash
# The GPU checks whose numbers the README records (one GPU, bf16 autocast): the polyp protocol at 352 px on
# Kvasir-SEG, the speed benchmark, the CEAL protocol at the paper's size (ISIC 2017's Table 1 counts,
# width 64, 256 px) on synthetic data, since the ISIC archive is not available to this work, and --deterministic
# on CUDA (every script's small folder run twice, and the CUDA-only tests), the same with the second run stopped
# by SIGINT and resumed (resume), and the SSL protocol at the paper's size (ssl: ISIC 2017's counts, width 32,
# 256 px, 100 pre-training epochs, on synthetic data as CEAL). Each step runs even if one before it fails. Logs,
# and each run folder as NAME-run.tar.gz (checkpoints left out) once its step ends, go to OUT_DIR; a step cut
# short still leaves its log.
#   bash benchmarks/gpu.sh KVASIR_SEG_DIR OUT_DIR [STEP ...]
# STEPs (default: all, in this order): polyp speed ceal deterministic cuda-tests resume ssl; ssl-resume, only
# when named, goes on with the ssl step's run: SSL_LIMIT_S=N stops ssl with SIGINT after N seconds, and both
# calls need the same RUNS_DIR (default: a new temporary folder), e.g. RUNS_DIR=runs/gpu.
# The first three took 470 s on an H100 (526 s at 9b41510); on an H200, deterministic 156 s, cuda-tests 21 s, polyp 70 s, speed
# 153 s, and ceal cut off by the command's 600 s limit after about 200 s, in round 8 of 10 (4 min 03 s on the
# H100); at 04ae9b6 on an H200, resume 312 s, ssl 4.0 s per pre-training epoch (about 7 minutes for the 100).
# Name fewer to fit one command into a time limit.
set -u
kvasir=$1
out=$2
shift 2
only=" ${*:-polyp speed ceal deterministic cuda-tests resume ssl} "
runs=${RUNS_DIR:-$(mktemp -d)}  # ssl-resume needs the ssl step's: RUNS_DIR=runs/gpu on both calls
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step NAME COMMAND...: run it, log to OUT_DIR/NAME.log, print its wall time and exit status
    local name=$1 t0=$SECONDS rc
    shift
    case $only in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*" | tee "$out/$name.log"
    "$@" >>"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc, wall $((SECONDS - t0)) s" | tee -a "$out/$name.log"
    tail -n 4 "$out/$name.log" | head -n 3
    if [ -d "$runs/$name" ]; then tar -czf "$out/$name-run.tar.gz" -C "$runs" --exclude='*.pt' "$name"; fi
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/machine.txt"
step polyp "$py" polyp_weighted_cluster.py --data kvasir-seg --data-dir "$kvasir" --device cuda --amp \
    --out "$runs/polyp"
step speed "$py" benchmarks/speed.py --device cuda --amp
step ceal "$py" ceal_mcdropout.py --data synthetic --split 1600 400 600 --initial 600 --query 35 --rounds 10 \
    --epochs-initial 20 --epochs 5 --batch-size 32 --lr 1e-4 --width 64 --image-size 256 --pseudo-step 20 \
    --mc-passes 20 --device cuda --amp --out "$runs/ceal"
step deterministic "$py" benchmarks/behaviour.py --repeat --device cuda --deterministic
step cuda-tests "$py" -m pytest -q tests -k "cuda or deterministic or bilinear or block_mean"
step resume "$py" benchmarks/behaviour.py --repeat --interrupt --device cuda --deterministic
ssl_folder() { find "$runs/ssl" -mindepth 1 -maxdepth 1 -type d | head -n 1; }
step ssl timeout -s INT "${SSL_LIMIT_S:-0}" "$py" ssl_coldstart.py --data synthetic --split 1600 0 400 --initial 300 \
    --query 35 --rounds 9 --epochs-initial 10 --epochs 2 --batch-size 10 --lr 1e-4 --width 32 --image-size 256 \
    --clusters 10 --aap-grid 2 --ssl-epochs 100 --shuffle-blocks 10000 --device cuda --amp --out "$runs/ssl"
case $only in *" ssl-resume "*)  # the ssl step's run folder, stopped by SSL_LIMIT_S: on to its end
    step ssl-resume "$py" ssl_coldstart.py --resume "$(ssl_folder)" --device cuda
    tar -czf "$out/ssl-resume-run.tar.gz" -C "$runs" --exclude='*.pt' ssl ;;
esac
