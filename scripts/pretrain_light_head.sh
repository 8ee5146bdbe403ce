#!/usr/bin/env bash
# Pretrain the light mask head (--mask_head light) of a tiny base on the 2D pretraining scenes: the light route's
# counterpart of the base's SAM stage, so that a light fine-tune does not start from a random decoder.
#
#   bash scripts/pretrain_light_head.sh            # -> $BASE/light_decoder.safetensors + light_pretrain_record.json
#
# The scenes are the generator's at the pretraining seed (dataset.synthetic.pretrain.PRETRAIN_SEED: the scenes the
# base's LLaVA and SAM were pretrained on, never a benchmark scene), used as 2D images: centre view only, no CAAM,
# no depth. train_ds.py trains LoRA + [SEG] + the light decoder on their referring expressions; only the decoder is
# kept (the LoRA is a fresh one in every fine-tune). Rerun the same command after a kill: the run resumes.
# The CPU budget is the shipped SAM stage's (pretrain_record.json: 3092 s on one thread); the record says what
# this run used.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

BASE=${BASE:-pretrained/tiny_base_v3}
WORK=${LFLLM_LIGHT_PRETRAIN:-./light_pretrain}
NUM_SCENES=${NUM_SCENES:-512}
NUM_HELD_OUT=${NUM_HELD_OUT:-16}
EPOCHS=${EPOCHS:-4}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-500}
LR=${LR:-1e-3}
LIGHT_DETAIL_SIZE=${LIGHT_DETAIL_SIZE:-336}
LIGHT_DIM=${LIGHT_DIM:-256}
DS=pretrain-2d
PY=.venv/bin/python
export TOKENIZERS_PARALLELISM=false
for knob in NUM_SCENES NUM_HELD_OUT EPOCHS STEPS_PER_EPOCH LIGHT_DETAIL_SIZE LIGHT_DIM; do
  if ! [[ ${!knob} =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $knob=${!knob}: expected a positive whole number" >&2
    exit 2
  fi
done
if [ ! -f "$BASE/llava/config.json" ]; then
  echo "error: $BASE/llava/config.json not found: BASE must be a tiny base folder (scripts/pretrain_tiny_base.py)" >&2
  exit 2
fi
if [ -e "$BASE/light_decoder.safetensors" ] && [ "${OVERWRITE:-0}" != 1 ]; then
  echo "error: $BASE/light_decoder.safetensors exists: OVERWRITE=1 replaces it (or set BASE to another folder)" >&2
  exit 2
fi
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  PRECISION=bf16 RANKS=1 RANK_THREADS=${OMP_NUM_THREADS:-$(nproc)}
else  # as the quickstart: 2 single-thread ranks of one scene on a CPU with 2 cores or more
  export DS_ACCELERATOR=cpu
  PRECISION=fp32
  if [ "$(nproc)" -ge 2 ]; then RANKS=2 RANK_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / 2 ))}; else RANKS=1 RANK_THREADS=1; fi
fi
SEED=$($PY -c "from dataset.synthetic.pretrain import PRETRAIN_SEED; print(PRETRAIN_SEED)")
PROMPT_ORDER=$($PY - "$BASE/pretrain_record.json" <<'EOF'
import json, os, sys
rec = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
first = rec.get("llava", {}).get("instruct", {}).get("options", {}).get("image_first", True)
print("image_first" if first else "expression_first")
EOF
)
start=$(date +%s)
if [ ! -f "$WORK/dataset/refer_seg/$DS/instances.json" ]; then
  $PY scripts/make_synthetic_data.py --dataset_dir "$WORK/dataset" --ds_name $DS --seed "$SEED" \
    --height 120 --width 160 --num_train "$NUM_SCENES" --num_val "$NUM_HELD_OUT" --workers 2
fi
data_s=$(( $(date +%s) - start ))
OMP_NUM_THREADS=$RANK_THREADS .venv/bin/deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29527}" train_ds.py \
  --version "$BASE/llava" --mask_head light --light_detail_size "$LIGHT_DETAIL_SIZE" --light_dim "$LIGHT_DIM" \
  --no_caam --no_depth --dataset_dir "$WORK/dataset" --refer_seg_data $DS --val_dataset "$DS|syn|val" \
  --log_base_dir "$WORK/runs" --exp_name light_pretrain --precision $PRECISION --prompt_order "$PROMPT_ORDER" \
  --lora_r 32 --lora_alpha 64 --lora_dropout 0 \
  --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
  --epochs "$EPOCHS" --steps_per_epoch "$STEPS_PER_EPOCH" --batch_size $(( 2 / RANKS )) --grad_accumulation_steps 1 \
  --lr "$LR" --warmup_steps 20 --workers 1 --no_gradient_checkpointing --feature_cache "$WORK/feature_cache"
wall=$(( $(date +%s) - start ))
RUN="$WORK/runs/light_pretrain"
$PY - "$RUN" "$BASE" "$wall" "$data_s" "$RANKS" "$RANK_THREADS" <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path

import torch

from model.light_decoder import LightDecoderConfig, read_light_decoder, save_light_decoder
run, base, wall, data_s, ranks, threads = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:7])
src = run / "export" / "last" / "light_decoder.safetensors"
if not src.is_file():
    sys.exit(f"error: {src} not found: the run did not finish its export")
log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
val = run / "val_record.json"
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
record = {
    "command": "bash scripts/pretrain_light_head.sh",
    "commit": commit,
    "machine": platform.processor() or platform.machine(),
    "ranks": ranks,
    "threads_per_rank": threads,
    "wall_s_this_run": wall,
    "data_s": data_s,
    "cpu_s_training": (wall - data_s) * ranks * threads,
    "run": str(run),
    "train_options": json.loads((run / "export" / "last" / "trainable.json").read_text()),
    "first_loss": log[0].get("loss") if log else None,
    "last_loss": log[-1].get("loss") if log else None,
    "held_out": json.loads(val.read_text()) if val.is_file() else None,
    "stored_dtype": "float16",  # half the size of the run's float32 export; loading casts back
}
tensors, shapes, run_record = read_light_decoder(src)
if not all(bool(torch.isfinite(t.half()).all()) for t in tensors.values()):
    sys.exit(f"error: {src} holds a weight beyond float16's range; keep the float32 export instead")
save_light_decoder(
    tensors, LightDecoderConfig(**shapes), base / "light_decoder.safetensors", record=run_record, dtype=torch.float16
)
(base / "light_pretrain_record.json").write_text(json.dumps(record, indent=2))
print(f"wrote {base / 'light_decoder.safetensors'} and {base / 'light_pretrain_record.json'} ({wall} s)")
EOF
