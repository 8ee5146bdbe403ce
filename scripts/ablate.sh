#!/usr/bin/env bash
# The LISA-vs-LFLLM ablation (issue 16): LISA (--no_caam --no_depth), +depth (--no_caam), +CAAM (--no_depth)
# and LFLLM (both), each trained from the same base for the same steps on the quickstart's training data,
# with every seed of SEEDS, then merged and evaluated on a large val set from the same generator (another
# seed, its own dataset name) in which every reported subset has >= MIN_SUBSET expressions. Writes
# $OUT/ablation.md (gIoU and cIoU tables: mean ± std over seeds per subset), $OUT/ablation.json and
# $OUT/ablation.png; PUBLISH=1 also copies the plot to docs/images/ablation.png.
#
# A killed ablation resumes with the same command: a run whose $OUT/results/<run>/eval.json exists is
# skipped, a run killed in training continues from its last checkpoint. Settings that would make the runs
# incomparable (base, schedule, data) are recorded in $OUT/settings.json and may not change for one OUT;
# SEEDS and CAAM_MODES may grow. Per-run logs: $OUT/logs/<run>.{train,merge,eval}.log (VERBOSE=1 also
# streams them). Knobs (environment):
#   OUT=./ablation  BASE=pretrained/tiny_base (llava/ + sam_tiny.pth; BASE=random: a random tiny base in $OUT,
#   its SAM pretrained SAM_PRETRAIN_STEPS=0 steps, for smoke runs)  SEEDS="0 1 2"
#   EPOCHS=3 STEPS=250 (optimiser steps per epoch; the first quickstart's schedule, 3 × 250)  LR=1e-3
#   NUM_TRAIN=64 (train scenes, generator seed 0: the quickstart's)  NUM_VAL=600 VAL_SEED=1 (ablation val set)
#   MIN_SUBSET=100  CAAM_MODES="" (e.g. "learned occlusion": one more LFLLM row per mode)  WORKERS=2
#   KEEP_CKPT=0 (1 keeps each run's DeepSpeed checkpoint; its export/last is always kept)  MASTER_PORT=29527
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

declare -A DEFAULTS=([OUT]=./ablation [BASE]=pretrained/tiny_base [SEEDS]="0 1 2" [EPOCHS]=3 [STEPS]=250
  [LR]=1e-3 [NUM_TRAIN]=64 [NUM_VAL]=600 [VAL_SEED]=1 [MIN_SUBSET]=100 [CAAM_MODES]="")
CMD=""  # the command line, for the record: the knobs that differ from their defaults
for knob in OUT BASE SEEDS EPOCHS STEPS LR NUM_TRAIN NUM_VAL VAL_SEED MIN_SUBSET CAAM_MODES; do
  [ -n "${!knob+set}" ] || declare "$knob=${DEFAULTS[$knob]}"
  [ "${!knob}" = "${DEFAULTS[$knob]}" ] || CMD+="$knob='${!knob}' "
done
CMD+="bash scripts/ablate.sh"
DS=ref-urbanlf-syn
VAL_DS=ref-urbanlf-syn-abl
HEIGHT=120
WIDTH=160
TOTAL_STEPS=$((EPOCHS * STEPS))
PY=.venv/bin/python
PORT=${MASTER_PORT:-29527}
export TOKENIZERS_PARALLELISM=false

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PRECISION=bf16
else
  export DS_ACCELERATOR=cpu
  PRECISION=fp32
fi
start=$SECONDS
stamp() { echo "[ablate +$((SECONDS - start))s] $*"; }

# run_logged LOG CMD...: the command's output goes to LOG (and the terminal with VERBOSE=1); a failure
# ends the ablation with the log's last lines.
run_logged() {
  local log=$1 rc=0
  shift
  if [ "${VERBOSE:-0}" = 1 ]; then
    "$@" 2>&1 | tee "$log" || rc=$?
  else
    "$@" >"$log" 2>&1 || rc=$?
  fi
  if [ "$rc" != 0 ]; then
    echo "error: '$*' failed (exit $rc); the end of $log:" >&2
    tail -n 30 "$log" >&2
    exit "$rc"
  fi
}

if [ "$BASE" != random ] && { [ ! -f "$BASE/llava/config.json" ] || [ ! -f "$BASE/sam_tiny.pth" ]; }; then
  echo "error: BASE=$BASE must hold llava/ (HF LLaVA dir) and sam_tiny.pth (python scripts/pretrain_tiny_base.py" \
    "--out $BASE rebuilds the shipped one; BASE=random makes a random tiny base, for a smoke run)" >&2
  exit 2
fi
mkdir -p "$OUT/logs" "$OUT/results"

stamp "1/5 data -> $OUT/dataset: train $DS ($NUM_TRAIN scenes, seed 0), val $VAL_DS ($NUM_VAL scenes, seed $VAL_SEED)"
if [ ! -f "$OUT/dataset/refer_seg/$DS/$DS.json" ]; then
  run_logged "$OUT/logs/data_train.log" $PY scripts/make_synthetic_data.py --dataset_dir "$OUT/dataset" \
    --ds_name $DS --height $HEIGHT --width $WIDTH --num_train "$NUM_TRAIN" --num_val 16 --seed 0 \
    --workers "${WORKERS:-2}"
fi
if [ ! -f "$OUT/dataset/refer_seg/$VAL_DS/$VAL_DS.json" ]; then
  run_logged "$OUT/logs/data_val.log" $PY scripts/make_synthetic_data.py --dataset_dir "$OUT/dataset" \
    --ds_name $VAL_DS --height $HEIGHT --width $WIDTH --num_train 0 --num_val "$NUM_VAL" --seed "$VAL_SEED" \
    --workers "${WORKERS:-2}"
fi

stamp "2/5 base: $BASE"
BASE_DIR=$BASE
if [ "$BASE" = random ]; then
  BASE_DIR="$OUT/tiny_base"
  if [ ! -f "$BASE_DIR/sam_tiny.pth" ]; then
    run_logged "$OUT/logs/base.log" $PY scripts/make_tiny_base.py --out "$BASE_DIR" --dataset_dir "$OUT/dataset" \
      --ds $DS --sam_pretrain_steps "${SAM_PRETRAIN_STEPS:-0}"
  fi
fi
BASE_SHA=$(find "$BASE_DIR/llava" "$BASE_DIR/sam_tiny.pth" -maxdepth 1 -type f -print0 | sort -z | xargs -0 cat |
  sha256sum | cut -c1-16)
$PY scripts/ablation_report.py record --frozen --file "$OUT/settings.json" "base=$BASE" "base_sha256=$BASE_SHA" \
  "epochs=$EPOCHS" "steps_per_epoch=$STEPS" "total_steps=$TOTAL_STEPS" "lr=$LR" batch_size=2 \
  "train_data=$DS" "num_train=$NUM_TRAIN" train_seed=0 "val_data=$VAL_DS" "num_val=$NUM_VAL" \
  "val_seed=$VAL_SEED" "height=$HEIGHT" "width=$WIDTH" "precision=$PRECISION"

stamp "3/5 val set check: every reported subset needs >= $MIN_SUBSET expressions"
$PY scripts/ablation_report.py count --dataset_dir "$OUT/dataset" --ds $VAL_DS --min "$MIN_SUBSET"

mapfile -t RUNS < <($PY scripts/ablation_report.py plan --seeds "$SEEDS" --caam_modes "$CAAM_MODES")
[ "${#RUNS[@]}" -gt 0 ] || exit 2
stamp "4/5 ${#RUNS[@]} runs, $TOTAL_STEPS steps each ($EPOCHS x $STEPS, batch 2, lr $LR, $PRECISION)"
done_here=0
spent=0
for i in "${!RUNS[@]}"; do
  IFS='|' read -r name label flags cacheable <<<"${RUNS[$i]}"
  tag="[$((i + 1))/${#RUNS[@]}] $name ($label)"
  if [ -f "$OUT/results/$name/eval.json" ]; then
    stamp "$tag: evaluated before, skipped"
    continue
  fi
  seed=${name##*_seed}
  cache=()
  [ "$cacheable" = 1 ] && cache=(--feature_cache "$OUT/feature_cache")
  eta=""
  [ "$done_here" = 0 ] || eta=", about $(((${#RUNS[@]} - i) * spent / done_here / 60 + 1)) min left"
  stamp "$tag: train, flags '${flags:-none}', seed $seed (log $OUT/logs/$name.train.log$eta)"
  t0=$SECONDS
  # shellcheck disable=SC2086  # $flags: the variant's flags, word-split on purpose
  run_logged "$OUT/logs/$name.train.log" .venv/bin/deepspeed --num_gpus 1 --master_port "$PORT" train_ds.py \
    --version "$BASE_DIR/llava" --vision_pretrained "$BASE_DIR/sam_tiny.pth" \
    --dataset_dir "$OUT/dataset" --refer_seg_data $DS --val_dataset "$VAL_DS|syn|val" \
    --log_base_dir "$OUT/runs" --exp_name "$name" --precision $PRECISION --seed "$seed" \
    --epochs "$EPOCHS" --steps_per_epoch "$STEPS" --batch_size 2 --grad_accumulation_steps 1 \
    --lr "$LR" --warmup_steps 20 --workers 1 --no_gradient_checkpointing --no_eval $flags "${cache[@]}"
  t1=$SECONDS
  stamp "$tag: merge, evaluate on $VAL_DS"
  rm -rf "$OUT/merged/$name"
  run_logged "$OUT/logs/$name.merge.log" $PY merge_lora_weights_and_save_hf_model.py \
    --version "$BASE_DIR/llava" --vision_pretrained "$BASE_DIR/sam_tiny.pth" \
    --weight "$OUT/runs/$name/export/last" --save_path "$OUT/merged/$name" --precision $PRECISION
  t2=$SECONDS
  run_logged "$OUT/logs/$name.eval.log" .venv/bin/deepspeed --num_gpus 1 --master_port "$PORT" train_ds.py \
    --eval_only --version "$OUT/merged/$name" --dataset_dir "$OUT/dataset" --val_dataset "$VAL_DS|syn|val" \
    --log_base_dir "$OUT/results" --exp_name "$name" --precision $PRECISION --workers 1 "${cache[@]}"
  t3=$SECONDS
  rm -rf "$OUT/merged/$name"
  [ "${KEEP_CKPT:-0}" = 1 ] || rm -rf "$OUT/runs/$name/ckpt_model"
  $PY scripts/ablation_report.py record --file "$OUT/results/$name/run.json" "run=$name" "label=$label" \
    "seed=$seed" "total_steps=$TOTAL_STEPS" "train_s=$((t1 - t0))" "merge_s=$((t2 - t1))" "eval_s=$((t3 - t2))"
  done_here=$((done_here + 1))
  spent=$((spent + t3 - t0))
  stamp "$tag: done in $((t3 - t0)) s (train $((t1 - t0)), merge $((t2 - t1)), eval $((t3 - t2)))"
  grep -E "^ +All|^gIoU|^cIoU" "$OUT/logs/$name.eval.log" | sed 's/^/    /' || true
done

stamp "5/5 report -> $OUT/ablation.{md,json,png}"
$PY scripts/ablation_report.py report --out "$OUT" --seeds "$SEEDS" --caam_modes "$CAAM_MODES" \
  --wall_s "$((SECONDS - start))" --command_line "$CMD"
if [ "${PUBLISH:-0}" = 1 ]; then
  mkdir -p docs/images
  cp "$OUT/ablation.png" docs/images/ablation.png
  stamp "published docs/images/ablation.png"
fi
stamp "done"
