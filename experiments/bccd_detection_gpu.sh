#!/usr/bin/env bash
# BCCD detection, the full comparison, for one GPU (prepared, NOT run: no device was lent when it was
# written). experiments/compare_bccd_detection.py with isal, ent_gn, entropy, coreset, localization_stability,
# ll4al and random, 3 trials, at ISAL's R50 config (fcos_isal_r50: FCOS on ResNet-50, 256 channels, 4 convs a
# tower) on BCCD's own 640x480 images; 20 initial + 20 per cycle, 3 cycles (20, 40, 60 images), 60 epochs a
# cycle (batch 8: 180, 300, 480 iterations; warm-up 50; a fixed count per cycle gave the larger labelled sets
# fewer epochs, and the CPU run's AP then collapsed after cycle 0), the backbone from scratch (no weights reach the machine), ISAL's
# pseudo-boxes at score 0.1 (its README's command). ll4al was added after the sizing below (its cycle 0 trains
# once more, with the loss-prediction module).
#
# Sized for about 9 minutes of an H100 (a guess: no detection run has been timed on a GPU): one process
# per trial (seed 0, 1, 2: each its trial 0), each given what is left of BUDGET_S; a trial cut off by the
# budget keeps its finished cycles (results.jsonl is written after every cycle) and resumes at its next
# cycle when the script is run again with the same RUNS folder (carry it). Its train_seconds and
# selection_seconds say how to resize (iterations, cycles) for the next run.
#
# On the GPU machine, from the repository root, with BCCD's archive carried in an ignored folder
# (`mkdir -p .gpu_data && cp ../shared/data/bccd-voc.tar.gz .gpu_data/`, 7.4 MB, `/.gpu_data/` in
# .git/info/exclude; no network there):
#   bash experiments/bccd_detection_gpu.sh [RUNS_FOLDER]
# $OUT gets 6 files (a device call brings back at most 8): bccd_detection_gpu.md (the table over the seeds),
# .csv (every record), _boxes.png, _images.png (the curves), log.txt, devices.txt; each seed's own table is
# in RUNS_FOLDER.
# Check at toy size on any machine (two seeds, 2 cycles; a shared CPU: 10-20 minutes):
#   QUICK=1 BUDGET_S=3600 PYTHON=.venv/bin/python OUT=/tmp/bccd_gpu_quick bash experiments/bccd_detection_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. JAXAL_SHARED_DATA=${JAXAL_SHARED_DATA:-.gpu_data} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bccd_detection_gpu_out}
RUNS=${1:-runs/bccd_detection_gpu}
BUDGET_S=${BUDGET_S:-540}  # seconds for all the seeds (QUICK on a shared CPU needs more: BUDGET_S=3600)
PYTHON=${PYTHON:-python3}  # the GPU machine's python3 holds JAX (CUDA) and Flax
STRATEGIES=${STRATEGIES:-isal,ent_gn,entropy,coreset,localization_stability,ll4al,random}
SIZE=(model=fcos_isal_r50 detection.config=fcos_isal detection.channels=256 detection.stacked_convs=4
      boxes.canvas=640 batch_size=8 detection.iterations=none epochs=60 detection.warmup_iters=50)
if [[ -n "${QUICK:-}" ]]; then  # the script's check: tiny detector, 2 cycles of a few iterations, two seeds
  SIZE=(boxes.canvas=128 detection.channels=32 detection.iterations=4 detection.warmup_iters=1 cycles=2 initial_size=8
        budget=4 boxal.s_test_images=4 influence.repeats=1)
  TRIALS=(0 1)
else
  TRIALS=(0 1 2)
fi
mkdir -p "$OUT" "$RUNS"
"$PYTHON" -c 'import jax; print(jax.devices())' | tee "$OUT/devices.txt"
for SEED in "${TRIALS[@]}"; do
  LEFT=$((BUDGET_S - SECONDS))
  if (( LEFT < 30 )); then echo "budget spent: seed $SEED not started" | tee -a "$OUT/log.txt"; break; fi
  if ! timeout "$LEFT" "$PYTHON" experiments/compare_bccd_detection.py --strategy "$STRATEGIES" \
      --workdir "$RUNS/seed$SEED" --name "bccd_detection_gpu_seed$SEED" --out "$RUNS" \
      --override trials=1 seed="$SEED" boxal.pseudo_score=0.1 "${SIZE[@]}" 2>&1 | tee -a "$OUT/log.txt"; then
    echo "seed $SEED stopped (the budget's timeout or an error above); rerun with the same RUNS folder to resume" \
      | tee -a "$OUT/log.txt"
  fi
done
# every finished cycle of every seed: the table and the curves (mean +- std over the seeds)
"$PYTHON" experiments/compare_bccd_detection.py --summary-only --name bccd_detection_gpu --out "$OUT" \
  --workdir "$(printf "$RUNS/seed%s," "${TRIALS[@]}" | sed 's/,$//')" | tee -a "$OUT/log.txt"
