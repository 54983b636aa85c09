#!/usr/bin/env bash
# Sparsity sweep on the LM sample that calibrates once: the first run trains dense, calibrates and writes dense weights
# and stats.pt; the sweep reuses both (pruning.dense_ckpt, pruning.stats_path), so each point only fine-tunes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/sweeps/lm_$(date +%Y-%m-%d_%H-%M-%S)
python run.py pruning=ap90 hydra.run.dir="$out/base" "$@"
python run.py -m pruning=ap20,ap50,ap70,ap80,random50,random90 dense_finetune_baseline=false \
  pruning.dense_ckpt="$out/base/checkpoints/dense/last.ckpt" pruning.stats_path="$out/base/stats.pt" \
  hydra.sweep.dir="$out/sweep" "$@"
python scripts/collect_results.py "$out"
