#!/usr/bin/env bash
# The LISA-vs-LFLLM ablation (issues 16, 35) on the default route: LISA (--no_caam --no_depth), +depth (--no_caam),
# +CAAM (--no_depth) and LFLLM (both), each one run of scripts/quickstart.sh (its data, base, LoRA, schedule and
# ranks: not a shortened recipe; every row has the semantic fusion, the depth stream comes with the depth module)
# for every seed of SEEDS, then its merged model evaluated on a large val set from the same generator (another
# seed, its own dataset name) in which every reported subset has >= MIN_SUBSET expressions — on exact inputs and
# under each probe of PROBES (train_ds.py --eval_input: swapped_disparity, centre_views), which shows what each
# variant reads. ESTIMATE=1 adds an LFLLM row trained and evaluated on the built-in estimator's disparity.
# Writes $OUT/ablation.md (gIoU and cIoU tables, mean ± std over seeds per subset; the probes' change tables),
# $OUT/ablation.json and $OUT/ablation.png; PUBLISH=1 also copies the plot to docs/images/ablation.png.
#
# A killed ablation resumes with the same command: a run whose evaluations exist is skipped, a run killed in
# training continues from its last checkpoint (the quickstart's auto-resume). Settings that would make the runs
# incomparable are recorded in $OUT/settings.json and may not change for one OUT; SEEDS, CAAM_MODES, ESTIMATE and
# PROBES may grow. Per-run logs: $OUT/logs/<run>.{quickstart,eval*}.log. Knobs (environment):
#   OUT=./ablation  SEEDS="0 1 2"  VAL_SCENES=600 VAL_SEED=2 (the ablation val set; seeds 0 and 1 generate the
#   quickstart's training scenes and are refused)  MIN_SUBSET=100  CAAM_MODES="" (e.g. "learned": one more LFLLM
#   row per mode, trained without the feature cache)  ESTIMATE=1  PROBES="swapped_disparity centre_views"
#   MASTER_PORT=29527; the quickstart's own knobs (BASE, EPOCHS, STEPS_PER_EPOCH, NUM_TRAIN, NUM_EXTRA, LR, …)
#   pass through to every run and are recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh

declare -A DEFAULTS=([OUT]=./ablation [SEEDS]="0 1 2" [VAL_SCENES]=600 [VAL_SEED]=2 [MIN_SUBSET]=100 [CAAM_MODES]=""
  [ESTIMATE]=1 [PROBES]="swapped_disparity centre_views")
CMD=""  # the command line, for the record: the knobs that differ from their defaults
for knob in OUT SEEDS VAL_SCENES VAL_SEED MIN_SUBSET CAAM_MODES ESTIMATE PROBES; do
  [ -n "${!knob+set}" ] || declare "$knob=${DEFAULTS[$knob]}"
  [ "${!knob}" = "${DEFAULTS[$knob]}" ] || CMD+="$knob='${!knob}' "
done
CMD+="bash scripts/ablate.sh"
if [ "$VAL_SEED" = 0 ] || [ "$VAL_SEED" = 1 ]; then
  echo "error: VAL_SEED=$VAL_SEED: the quickstart trains on the scenes of generator seeds 0 and 1; choose another" >&2
  exit 2
fi
if [ "$ESTIMATE" != 0 ] && [ "$ESTIMATE" != 1 ]; then
  echo "error: ESTIMATE=$ESTIMATE: expected 1 (add the estimated-disparity row) or 0" >&2
  exit 2
fi
for probe in $PROBES; do
  case $probe in swapped_disparity | centre_views) ;; *)
    echo "error: PROBES: '$probe' is not a probe of --eval_input (swapped_disparity, centre_views)" >&2
    exit 2 ;;
  esac
done
DS=ref-urbanlf-syn
VAL_DS=ref-urbanlf-syn-abl
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
mkdir -p "$OUT/logs" "$OUT/results" "$OUT/runs" "$OUT/dataset" "$OUT/feature_cache"

stamp "1/4 val set -> $OUT/dataset: $VAL_DS ($VAL_SCENES scenes, generator seed $VAL_SEED)"
if [ ! -f "$OUT/dataset/refer_seg/$VAL_DS/$VAL_DS.json" ]; then
  run_logged "$OUT/logs/data_val.log" $PY scripts/make_synthetic_data.py --dataset_dir "$OUT/dataset" \
    --ds_name $VAL_DS --height "${HEIGHT:-120}" --width "${WIDTH:-160}" --num_train 0 --num_val "$VAL_SCENES" \
    --seed "$VAL_SEED" --workers 2
fi
$PY scripts/ablation_report.py count --dataset_dir "$OUT/dataset" --ds $VAL_DS --min "$MIN_SUBSET"
# What makes the runs comparable: the quickstart's recipe knobs as this shell sees them (unset: its defaults).
$PY scripts/ablation_report.py record --frozen --file "$OUT/settings.json" "recipe=scripts/quickstart.sh" \
  "base=${BASE:-pretrained/tiny_base_v3}" "epochs=${EPOCHS:-10}" "steps_per_epoch=${STEPS_PER_EPOCH:-250}" \
  "total_steps=$(( ${EPOCHS:-10} * ${STEPS_PER_EPOCH:-250} ))" "lr=${LR:-1e-3}" "num_train=${NUM_TRAIN:-64}" \
  "num_extra=${NUM_EXTRA:-448}" "lora_flags=${LORA_FLAGS-default}" "val_data=$VAL_DS" "num_val=$VAL_SCENES" \
  "val_seed=$VAL_SEED" "height=${HEIGHT:-120}" "width=${WIDTH:-160}" "precision=$PRECISION"

PLAN_FLAGS=(--seeds "$SEEDS" --caam_modes "$CAAM_MODES")
[ "$ESTIMATE" = 0 ] || PLAN_FLAGS+=(--estimate)
mapfile -t RUNS < <($PY scripts/ablation_report.py plan "${PLAN_FLAGS[@]}")
[ "${#RUNS[@]}" -gt 0 ] || exit 2
stamp "2/4 ${#RUNS[@]} runs of scripts/quickstart.sh, each evaluated on $VAL_DS: exact and under '$PROBES'"
done_here=0
spent=0
for i in "${!RUNS[@]}"; do
  IFS='|' read -r name label flags cacheable route <<<"${RUNS[$i]}"
  tag="[$((i + 1))/${#RUNS[@]}] $name ($label)"
  wanted=("$OUT/results/$name/eval.json")
  for probe in $PROBES; do wanted+=("$OUT/results/$name-$probe/eval.json"); done
  missing=0
  for f in "${wanted[@]}"; do [ -f "$f" ] || missing=1; done
  if [ "$missing" = 0 ]; then
    stamp "$tag: evaluated before, skipped"
    continue
  fi
  seed=${name##*_seed}
  run="$OUT/runs/$name"
  mkdir -p "$run"
  # one dataset and one feature cache for every run (the cache is keyed by everything that changes its entries)
  [ -e "$run/dataset" ] || ln -s "$(cd "$OUT" && pwd)/dataset" "$run/dataset"
  [ -e "$run/feature_cache" ] || ln -s "$(cd "$OUT" && pwd)/feature_cache" "$run/feature_cache"
  eval_flags=()
  [[ " $flags " == *" --depth_source estimate "* ]] && eval_flags=(--depth_source estimate)
  eta=""
  [ "$done_here" = 0 ] || eta=", about $(((${#RUNS[@]} - i) * spent / done_here / 60 + 1)) min left"
  t0=$SECONDS
  if [ ! -f "$run/merged/config.json" ]; then
    stamp "$tag: quickstart, flags '${flags:-none}', route '$route', seed $seed (log $OUT/logs/$name.quickstart.log$eta)"
    LFLLM_QUICKSTART="$run" SAM_ROUTE_FLAGS="$route" FEATURE_CACHE="$cacheable" MASTER_PORT="$PORT" \
      TRAIN_FLAGS="$flags --seed $seed" EVAL_FLAGS="${eval_flags[*]}" \
      run_logged "$OUT/logs/$name.quickstart.log" bash scripts/quickstart.sh
    echo $((SECONDS - t0)) > "$run/quickstart_s"  # its wall time, for run.json when the evaluations resume later
  fi
  t1=$SECONDS
  train_s=$(cat "$run/quickstart_s" 2>/dev/null || echo 0)
  cache=()
  [ "$cacheable" = 1 ] && cache=(--feature_cache "$OUT/feature_cache")
  for probe in exact $PROBES; do
    dest=$name
    [ "$probe" = exact ] || dest="$name-$probe"
    [ -f "$OUT/results/$dest/eval.json" ] && continue
    stamp "$tag: evaluate on $VAL_DS, --eval_input $probe"
    probe_flags=(--eval_input "$probe")
    [ "$probe" = exact ] && probe_flags+=("${cache[@]}")  # a probe changes the pixels: never from the cache
    run_logged "$OUT/logs/$dest.eval.log" $PY train_ds.py --eval_only --version "$run/merged" \
      --dataset_dir "$OUT/dataset" --val_dataset "$VAL_DS|syn|val" --log_base_dir "$OUT/results" --exp_name "$dest" \
      --precision $PRECISION --workers 1 "${probe_flags[@]}" "${eval_flags[@]}"
  done
  t2=$SECONDS
  [ "${KEEP_CKPT:-0}" = 1 ] || rm -rf "$run/runs/quickstart/ckpt_model"
  $PY scripts/ablation_report.py record --file "$OUT/results/$name/run.json" "run=$name" "label=$label" \
    "seed=$seed" "total_steps=$(( ${EPOCHS:-10} * ${STEPS_PER_EPOCH:-250} ))" "train_s=$train_s" \
    "eval_s=$((t2 - t1))"
  done_here=$((done_here + 1))
  spent=$((spent + t2 - t0))
  stamp "$tag: done in $((t2 - t0)) s (quickstart $((t1 - t0)), evaluations $((t2 - t1)))"
  grep -E "^ +All|^gIoU|^cIoU" "$OUT/logs/$name.eval.log" | sed 's/^/    /' || true
done

stamp "3/4 report -> $OUT/ablation.{md,json,png}"
REPORT_FLAGS=(--seeds "$SEEDS" --caam_modes "$CAAM_MODES")
[ "$ESTIMATE" = 0 ] || REPORT_FLAGS+=(--estimate)
$PY scripts/ablation_report.py report --out "$OUT" "${REPORT_FLAGS[@]}" --wall_s "$((SECONDS - start))" \
  --command_line "$CMD"
if [ "${PUBLISH:-0}" = 1 ]; then
  mkdir -p docs/images
  cp "$OUT/ablation.png" docs/images/ablation.png
  stamp "4/4 published docs/images/ablation.png"
fi
stamp "done"
