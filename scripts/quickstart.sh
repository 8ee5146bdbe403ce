#!/usr/bin/env bash
# The whole LFLLM loop on the embedded default, on a laptop-class CPU (or a GPU when there is one):
#   synthetic light fields -> pretrained tiny LLaVA + SAM base -> deepspeed train_ds.py -> merge -> eval -> predict.
# Everything lands in $LFLLM_QUICKSTART (default ./quickstart). Settings below are the knobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

OUT=${LFLLM_QUICKSTART:-./quickstart}
# GRES=1: the generalised benchmark (the same scenes with plural and no-target expressions beside the others,
# scripts/make_synthetic_data.py --gres) and a model that answers [REJ] for "no such object" (--gres).
GRES=${GRES:-0}
if [ "$GRES" != 0 ] && [ "$GRES" != 1 ]; then
  echo "error: GRES=$GRES: expected 0 (referring segmentation) or 1 (several targets or none)" >&2
  exit 2
fi
# TASKS=1: LISA's task mix on the generator's light-field versions of its tasks (make_synthetic_data.py --tasks):
# semantic segmentation of the scenes' categories, VQA about them and implicit reasoning queries beside the
# referring expressions, drawn 9:3:3:1 as LISA's --sample_rates; the merged model is also scored on the reasoning
# val set (implicit queries) and on the explicit expressions of the same targets.
TASKS=${TASKS:-0}
if [ "$TASKS" != 0 ] && [ "$TASKS" != 1 ]; then
  echo "error: TASKS=$TASKS: expected 0 (referring segmentation) or 1 (LISA's task mix)" >&2
  exit 2
fi
if [ "$TASKS" = 1 ] && [ "$GRES" = 1 ]; then
  echo "error: TASKS=1 with GRES=1: LISA's task mix trains one-[SEG] answers; choose one" >&2
  exit 2
fi
DS=$([ "$GRES" = 1 ] && echo ref-urbanlf-gres || echo ref-urbanlf-syn)
[ "$TASKS" = 0 ] || DS=ref-urbanlf-tasks
GEN_FLAGS=$([ "$GRES" = 1 ] && echo --gres || true)
[ "$TASKS" = 0 ] || GEN_FLAGS=--tasks
NUM_TRAIN=${NUM_TRAIN:-64}
NUM_VAL=${NUM_VAL:-16}
HEIGHT=${HEIGHT:-120}
WIDTH=${WIDTH:-160}
NUM_EXTRA=${NUM_EXTRA:-448}   # a second generated training set (seed 1, ~660 MB), sampled in proportion (≥ 1:1); 0: none
# How far the extra set's object placement follows the disparity (make_synthetic_data.py --perspective): 1 = nearer
# objects stand lower and are larger, as in the val set; 0 = placement independent of depth, so only the light field
# and occlusion tell which object is nearer.
EXTRA_PERSPECTIVE=${EXTRA_PERSPECTIVE:-1}
EPOCHS=${EPOCHS:-10}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-250}
LR=${LR:-1e-3}
SAM_PRETRAIN_STEPS=${SAM_PRETRAIN_STEPS:-600}
# The mask head: sam (SAM's decoder, with SAM_ROUTE_FLAGS) or light (MLLMSeg's decoder over the model's own
# features, no SAM; its detail pass runs the vision tower at LIGHT_DETAIL_SIZE px).
MASK_HEAD=${MASK_HEAD:-sam}
# The SAM route's extras: the LLM's image/depth-token states and the disparity itself reach SAM's decoder, the
# disparity also at the 4x finer grid the mask is read from (docs/RESULTS.md, "The depth stream's detail branch").
# SAM_ROUTE_FLAGS= (empty) trains the plain LISA-style route.
SAM_ROUTE_FLAGS=${SAM_ROUTE_FLAGS-"--semantic_fusion --depth_stream --depth_detail"}
LIGHT_DETAIL_SIZE=${LIGHT_DETAIL_SIZE:-336}
# The light decoder's start: the base's pretrained one when it has it (scripts/pretrain_light_head.sh), else fresh.
# LIGHT_PRETRAINED= (empty) starts it fresh.
# FEATURE_CACHE=0 encodes every image at every step (needed for a trained CAAM, --caam_mode learned/occlusion).
FEATURE_CACHE=${FEATURE_CACHE:-1}
# TRAIN_FLAGS: more train_ds.py flags for training (e.g. --seed 1); EVAL_FLAGS: for its evaluation
# (e.g. --depth_source estimate, to read the maps a model trained on estimated disparity expects).
PY=.venv/bin/python
export TOKENIZERS_PARALLELISM=false
if [ "$MASK_HEAD" != sam ] && [ "$MASK_HEAD" != light ]; then
  echo "error: MASK_HEAD=$MASK_HEAD: expected sam or light" >&2
  exit 2
fi
if [ "$FEATURE_CACHE" != 0 ] && [ "$FEATURE_CACHE" != 1 ]; then
  echo "error: FEATURE_CACHE=$FEATURE_CACHE: expected 1 (the per-scene cache) or 0 (none)" >&2
  exit 2
fi
CACHE=()
[ "$FEATURE_CACHE" = 0 ] || CACHE=(--feature_cache "$OUT/feature_cache")
if ! [[ $EXTRA_PERSPECTIVE =~ ^(0|1|0\.[0-9]+|1\.0*)$ ]]; then
  echo "error: EXTRA_PERSPECTIVE=$EXTRA_PERSPECTIVE: expected a number from 0 to 1 (e.g. 0, 0.5, 1)" >&2
  exit 2
fi
for knob in NUM_TRAIN NUM_VAL NUM_EXTRA EPOCHS STEPS_PER_EPOCH; do
  if ! [[ ${!knob} =~ ^[1-9][0-9]*$ || ( $knob = NUM_EXTRA && ${!knob} = 0 ) ]]; then
    echo "error: $knob=${!knob}: expected a positive whole number$([ $knob = NUM_EXTRA ] && echo ' or 0')" >&2
    exit 2
  fi
done
# An existing dataset is reused only if it is the one asked for (NUM_TRAIN/NUM_VAL/NUM_EXTRA may have changed).
reuse_dataset() {  # reuse_dataset NAME SCENES KNOBS -> 0: present with SCENES scenes, 1: absent, exit 2: other size
  local inst="$OUT/dataset/refer_seg/$1/instances.json"
  [ -f "$inst" ] || return 1
  local have
  have=$($PY -c "import json, sys; print(len(json.load(open(sys.argv[1]))['images']))" "$inst")
  if [ "$have" != "$2" ]; then
    echo "error: $inst holds $have scenes, $3 asks for $2: remove $OUT/dataset or set LFLLM_QUICKSTART to a new folder" >&2
    exit 2
  fi
}

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PRECISION=bf16
else
  export DS_ACCELERATOR=cpu
  PRECISION=fp32
fi
# The global batch is 2 scenes. On a CPU it is split over 2 ranks of one scene and one thread each when the machine
# has 2 cores or more: small matmuls scale poorly over threads, so two single-thread ranks train 1.26x faster than
# one two-thread rank here (docs/PERFORMANCE.md). A GPU trains both scenes on one rank.
NCORES=$(nproc 2>/dev/null || echo 1)
if [ "$PRECISION" = fp32 ] && [ "$NCORES" -ge 2 ]; then
  RANKS=2
  RANK_THREADS=${OMP_NUM_THREADS:-$(( NCORES / 2 ))}
else
  RANKS=1
  RANK_THREADS=${OMP_NUM_THREADS:-$NCORES}
fi
RANK_BATCH=$(( 2 / RANKS ))
start=$(date +%s)
stamp() { echo "[quickstart +$(( $(date +%s) - start ))s] $*"; }

stamp "1/5 synthetic light-field benchmark -> $OUT/dataset"
if ! reuse_dataset $DS $(( NUM_TRAIN + NUM_VAL )) "NUM_TRAIN + NUM_VAL"; then
  $PY scripts/make_synthetic_data.py --dataset_dir "$OUT/dataset" --ds_name $DS \
    --height "$HEIGHT" --width "$WIDTH" --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" --seed 0 --workers 2 $GEN_FLAGS
fi
DATA_FLAGS=(--refer_seg_data $DS)
if [ "$NUM_EXTRA" -gt 0 ]; then
  EXTRA=$DS-extra  # a set with other placement gets its own name, so neither is mistaken for the other
  [ "$EXTRA_PERSPECTIVE" = 1 ] || EXTRA=$DS-extra-p$EXTRA_PERSPECTIVE
  if ! reuse_dataset "$EXTRA" "$NUM_EXTRA" NUM_EXTRA; then
    $PY scripts/make_synthetic_data.py --dataset_dir "$OUT/dataset" --ds_name "$EXTRA" --perspective "$EXTRA_PERSPECTIVE" \
      --height "$HEIGHT" --width "$WIDTH" --num_train "$NUM_EXTRA" --num_val 0 --seed 1 --workers 2 $GEN_FLAGS
  fi
  DATA_FLAGS=(--refer_seg_data "$DS||$EXTRA" --sample_rates "1,$(( NUM_EXTRA >= NUM_TRAIN ? (NUM_EXTRA + NUM_TRAIN / 2) / NUM_TRAIN : 1 ))")
fi
if [ "$TASKS" = 1 ]; then  # the same datasets for every task; the referring datasets keep their weights
  SETS=${DATA_FLAGS[1]}
  REFER_RATES=$([ "${#DATA_FLAGS[@]}" -gt 2 ] && echo "${DATA_FLAGS[3]}" || echo 1)
  DATA_FLAGS=(--dataset "sem_seg||refer_seg||vqa||reason_seg" --sample_rates 9,3,3,1 --refer_seg_data "$SETS"
    --refer_seg_sample_rates "$REFER_RATES" --sem_seg_data "$SETS" --vqa_data "$SETS" --reason_seg_data "$SETS|train")
fi

# The base: the shipped pretrained tiny LLaVA + SAM, made by scripts/pretrain_tiny_base.py on generated 2D scenes
# disjoint from this benchmark, each with its record beside it: pretrained/tiny_base_v3 (the default: the
# better-grounding LLaVA, pretrained expression-first, with a 9000-step SAM), pretrained/tiny_base_v2 (the same
# LLaVA with a 3000-step SAM), pretrained/tiny_base (the first one, image-first), or BASE=random for
# the random-init tiny base of the tests (SAM pretrained SAM_PRETRAIN_STEPS on train-split points).
BASE=${BASE:-pretrained/tiny_base_v3}
# The quickstart's LoRA: rank 32 on every linear layer of the LM, alpha/r = 2 as LISA's r 8 / alpha 16, no
# dropout (a fifth of the CPU step; the same score at seed 0, docs/RESULTS.md). LORA_FLAGS= (empty) trains with train_ds.py's defaults.
LORA_FLAGS=${LORA_FLAGS-"--lora_r 32 --lora_alpha 64 --lora_dropout 0 --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}
if [ "$BASE" = random ]; then
  stamp "2/5 random tiny LLaVA + SAM base (tokenizer trained on the corpus; SAM pretrained on train-split point prompts) -> $OUT/tiny_base"
  if [ ! -f "$OUT/tiny_base/sam_tiny.pth" ]; then
    $PY scripts/make_tiny_base.py --out "$OUT/tiny_base" --dataset_dir "$OUT/dataset" --ds $DS \
      --sam_pretrain_steps "$SAM_PRETRAIN_STEPS"
  fi
  BASE="$OUT/tiny_base"
else
  stamp "2/5 pretrained tiny base: $BASE"
  for f in "$BASE/llava/config.json" "$BASE/sam_tiny.pth"; do
    if [ ! -f "$f" ]; then
      echo "error: $f not found: BASE must hold llava/ and sam_tiny.pth (python scripts/pretrain_tiny_base.py --out $BASE rebuilds it)" >&2
      exit 2
    fi
  done
fi
# The prompt order the base was pretrained in (its record's instruct stage; LLaVA's image-first when not recorded).
PROMPT_ORDER=${PROMPT_ORDER:-$($PY - "$BASE/pretrain_record.json" <<'EOF'
import json, os, sys
rec = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
first = rec.get("llava", {}).get("instruct", {}).get("options", {}).get("image_first", True)
print("image_first" if first else "expression_first")
EOF
)}

if [ "$MASK_HEAD" = light ]; then  # no SAM anywhere
  HEAD_FLAGS=(--mask_head light --light_detail_size "$LIGHT_DETAIL_SIZE")
  LIGHT_PRETRAINED=${LIGHT_PRETRAINED-$([ -f "$BASE/light_decoder.safetensors" ] && echo "$BASE/light_decoder.safetensors" || true)}
  if [ -n "$LIGHT_PRETRAINED" ]; then HEAD_FLAGS+=(--light_pretrained "$LIGHT_PRETRAINED"); fi
  MERGE_FLAGS=()
else
  read -r -a ROUTE <<< "$SAM_ROUTE_FLAGS"
  HEAD_FLAGS=(--vision_pretrained "$BASE/sam_tiny.pth" "${ROUTE[@]}")
  MERGE_FLAGS=(--vision_pretrained "$BASE/sam_tiny.pth")
fi
LF_MODULES="CAAM $([[ " ${TRAIN_FLAGS:-} " == *" --no_caam "* ]] && echo off || echo on), depth $([[ " ${TRAIN_FLAGS:-} " == *" --no_depth "* ]] && echo off || echo on)"
stamp "3/5 train with the deepspeed launcher, $RANKS rank(s) of $RANK_BATCH scene(s) (LoRA + [SEG] + ${MASK_HEAD} mask head ${HEAD_FLAGS[*]:2}; $LF_MODULES)"
OMP_NUM_THREADS=$RANK_THREADS .venv/bin/deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29517}" train_ds.py \
  --version "$BASE/llava" "${HEAD_FLAGS[@]}" \
  --dataset_dir "$OUT/dataset" "${DATA_FLAGS[@]}" --val_dataset "$DS|syn|val" \
  --log_base_dir "$OUT/runs" --exp_name quickstart --precision $PRECISION \
  --prompt_order "$PROMPT_ORDER" $LORA_FLAGS \
  --epochs "$EPOCHS" --steps_per_epoch "$STEPS_PER_EPOCH" --batch_size "$RANK_BATCH" --grad_accumulation_steps 1 \
  --lr "$LR" --warmup_steps 20 --workers 1 --no_gradient_checkpointing --no_eval \
  "${CACHE[@]}" $([ "$GRES" = 1 ] && echo --gres || true) ${TRAIN_FLAGS:-}

stamp "4/5 merge LoRA into a Hugging Face model -> $OUT/merged, then evaluate it"
$PY merge_lora_weights_and_save_hf_model.py --version "$BASE/llava" "${MERGE_FLAGS[@]}" \
  --weight "$OUT/runs/quickstart/export/last" --save_path "$OUT/merged" --precision $PRECISION
# A model whose answers state the box before [SEG] (--answer_box) is scored on what it generates.
PROTOCOL=$($PY -c "import json,sys; print('generated' if json.load(open(sys.argv[1])).get('answer_box') else 'teacher_forced')" "$OUT/merged/config.json")
.venv/bin/deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29517}" train_ds.py --eval_only \
  --version "$OUT/merged" --dataset_dir "$OUT/dataset" --val_dataset "$DS|syn|val" \
  --log_base_dir "$OUT/runs" --exp_name quickstart_eval --precision $PRECISION --workers 1 \
  "${CACHE[@]}" --vis_save_path "$OUT/vis" --eval_protocol "$PROTOCOL" ${EVAL_FLAGS:-} 2>&1 | tee "$OUT/eval_table.txt" | grep -v "^\[20" | grep -v "^eval ("
if [ "$TASKS" = 1 ]; then  # reasoning: the implicit queries, then the explicit expressions of the same targets
  for split in val val_explicit; do
    .venv/bin/deepspeed --num_gpus 1 --master_port "${MASTER_PORT:-29517}" train_ds.py --eval_only \
      --version "$OUT/merged" --dataset_dir "$OUT/dataset" --val_dataset "$DS|$split" \
      --log_base_dir "$OUT/runs" --exp_name "quickstart_eval_reason_$split" --precision $PRECISION --workers 1 \
      ${EVAL_FLAGS:-} 2>&1 | tee "$OUT/eval_reason_$split.txt" | grep -E "^ *(All|gIoU|cIoU|n )|^ref|^ReasonSeg"
  done
fi

stamp "5/5 predict one expression on a validation light field -> $OUT/predict"
SCENE=$($PY - "$OUT/dataset" $DS <<'EOF'
import json, sys
root, ds = sys.argv[1], sys.argv[2]
refs = json.load(open(f"{root}/refer_seg/{ds}/{ds}.json"))
ref = next(r for r in refs if r["split"] == "val")
print(f"Image{ref['image_id']}\t{ref['sentences'][0]['sent']}")
EOF
)
$PY chat.py --version "$OUT/merged" --precision $PRECISION \
  --lf_dir "$OUT/dataset/lf/$DS/${SCENE%%$'\t'*}" --prompt "${SCENE#*$'\t'}" --out "$OUT/predict"

stamp "done. Table: $OUT/runs/quickstart_eval/eval.json; overlays: $OUT/vis; prediction: $OUT/predict"
