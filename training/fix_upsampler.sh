#!/usr/bin/env bash
# The upsampler fine-tuned on whole 128 px canvases against the decoder's errors (training/train.py UPSAMPLER_FIX:
# colour and shape errors in its input, L1 loss, the stack's 2-step grid), from the shipped weights, then judged
# by the strict evaluator in process before and after, on the same machine. One GPU (H100/H200): about 10 minutes of
# device time (420 s of training, the "before" evaluation beside it, about 2 minutes of "after").
#   training/fix_upsampler.sh OUT_DIR                                  # one GPU, preset gpu-canvas
#   DEVICE=cpu PRESET=finetune training/fix_upsampler.sh runs/fix       # two CPU cores in the background (30 min)
#   DEVICE=cpu BUDGET_SCALE=0.002 EVAL="--prompts 1 --variations 0 --edits 0 --quick" training/fix_upsampler.sh runs/fix-smoke
# Writes under OUT_DIR (default $OUT): log.txt, eval-strict-before.json, eval-strict-after.json and
# super_res.tgz (super_res_first, super_res_last, super_res_scheduler: unpack over a copy of models/shapes-toy).
# Resumable: rerun with the same WORK to continue the fine-tune from its checkpoint.
set -euo pipefail
OUT_DIR=${1:-$OUT}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-gpu-canvas}
SCALE=${BUDGET_SCALE:-1.0}
EVAL=${EVAL:-"--prompts 48 --variations 12 --edits 12"}
WORK=${WORK:-/tmp/fix-upsampler}
M=$WORK/model
mkdir -p "$OUT_DIR" "$WORK/ckpt"
[ -d "$M" ] || cp -r models/shapes-toy "$M"
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1
date -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
# shellcheck disable=SC2086
$PY -m training.evaluate_strict --model models/shapes-toy --device "$DEVICE" $EVAL \
  --json "$OUT_DIR/eval-strict-before.json" > "$WORK/before.out" 2>&1 &
before=$!
$PY -m training.train --out "$M" --work "$WORK/ckpt" --preset "$PRESET" --device "$DEVICE" \
  --init-from models/shapes-toy --components super_res --budget-scale "$SCALE" --log-every 100
wait $before || { cat "$WORK/before.out"; exit 1; }
date -u
# shellcheck disable=SC2086
$PY -m training.evaluate_strict --model "$M" --device "$DEVICE" $EVAL --json "$OUT_DIR/eval-strict-after.json" \
  2>&1 | grep -v "Loading\|deprecated" || true
tar czf "$OUT_DIR/super_res.tgz" -C "$M" super_res_first super_res_last super_res_scheduler
date -u
