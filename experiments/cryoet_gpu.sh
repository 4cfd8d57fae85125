#!/usr/bin/env bash
# Simulated cryo-ET subtomograms at the full size, for a GPU (prepared, NOT run: no device was lent when it
# was written). Wang et al.'s third task on jaxal's simulation (jaxal.data.subtomograms): 40^3 volumes,
# AITom's DSRF3D-v2 at its published width (16.4M weights in its first dense layer), SNR 0.1 (AITom's
# demo) and 0.5; ent_gn, entropy, coreset, BALD and random; the preset's protocol otherwise (1000 in the
# pool, 500 test, 100 -> 500 labelled, 3 trials, the model kept across cycles). First the ghost-vs-vmap
# memory and time of the per-volume gradient norms at this size (experiments/bench_volumes.py), whose
# numbers choose --gradnorm.method and --gradnorm.chunk_size (vmap, 16 below: XLA's analysis on a CPU
# measured ghost at 4.7x vmap's memory per volume at 24^3 and 4.3x at 40^3, 513.9 vs 117.9 MiB). Then
# whether the CNN leaves chance at all with every training volume labelled (cryoet_learnability.py: on the
# CPU at 24^3 it did not in the steps a cycle gives it), which says how far the comparison can separate.
#   bash experiments/cryoet_gpu.sh [RUNS_FOLDER]
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${1:-../runs/cryoet_gpu}
mkdir -p "$RUNS"
python bench_volumes.py --model dsrf3d --size 40 --pool 64 --chunks 8,16 | tee "$RUNS.bench.txt"
python cryoet_learnability.py --model dsrf3d --size 40 --snr none,0.5,0.1 --train 1000 --test 500 \
  --epochs 40 --every 5 | tee "$RUNS/learnability.txt"
for SNR in 0.1 0.5; do
  python cryoet_simulated.py --strategy ent_gn,entropy,coreset,bald,random --workdir "$RUNS/snr$SNR" \
    --override model=dsrf3d "dataset=subtomograms_simulated:size=40,snr=$SNR,train=1000,test=500" \
    eval_batch_size=250 gradnorm.method=vmap gradnorm.chunk_size=16
  cp cryoet_simulated.md "cryoet_simulated_gpu_snr$SNR.md"
  cp cryoet_simulated.png "cryoet_simulated_gpu_snr$SNR.png"
done
