#!/usr/bin/env bash
# The paper's Capybara runs, one after the other: standard DPO (no prefix sharing), prefix sharing, and prefix sharing
# + packing; then a table of samples/s, tokens/s, peak memory and speedups over the baseline.
#
#   benchmark/run_capybara.sh                      # the paper's settings (Mistral-7B, ZeRO-3, flex_attention, bf16)
#
# On a machine without a GPU, with the offline stand-ins (a tiny Mistral and a 64-example Capybara-shaped dataset):
#
#   STAND_INS=/tmp/stand-ins MAX_STEPS=8 PACKING_LENGTH=4096 DATALOADER_WORKERS=0 OMP_NUM_THREADS=1 \
#       benchmark/run_capybara.sh
#
# That checks the pipeline, not the speedup: the stand-in has hidden size 64 against a 2074-token vocabulary, so the LM
# head, which TRL runs over every padded position off GPU, dominates. benchmark/throughput.py measures speedups on CPU.
# A 15872-token packed row is one dense attention mask on CPU (no FlexAttention), hence the smaller PACKING_LENGTH;
# OMP_NUM_THREADS=1 keeps timings steady when other jobs share the cores.
#
# Every setting is an environment variable (defaults in brackets):
#   DATASET            [argilla/distilabel-capybara-dpo-7k-binarized] hub id, local dir or .json/.jsonl/.parquet
#   MODEL              [mistralai/Mistral-7B-Instruct-v0.1]           hub id or local dir
#   STAND_INS          [unset] a directory: write `python embedded.py stand-ins` there (once) and use them for the
#                      DATASET and MODEL defaults
#   LAUNCHER           [auto] the command that runs train_dpo.py: "python", "accelerate launch", "torchrun ...";
#                      auto = "accelerate launch" when a CUDA GPU is visible, else "python"
#   ACCELERATE_CONFIG  [configs/zero3.yaml] passed as --config_file to "accelerate launch" when the file exists;
#                      set it empty for none
#   RUNS               [baseline sharing sharing+packing] which runs, in order ("packing" = packing alone)
#   BATCH_SIZE         [4]      --per_device_train_batch_size without packing (examples)
#   PACKED_BATCH_SIZE  [1]      --per_device_train_batch_size with packing (rows)
#   PACKING_LENGTH     [15872]  --packing_length (tokens per row, or auto)
#   MAX_STEPS          [-1]     --max_steps; -1 trains NUM_EPOCHS epochs
#   NUM_EPOCHS         [1]      --num_train_epochs
#   ATTN               [flex_attention] --attn_implementation (without CUDA the trainer falls back to sdpa)
#   LEARNING_RATE      [1e-6]   MAX_LENGTH [2842]   MAX_PROMPT_LENGTH [2180]
#   GRADIENT_CHECKPOINTING [True]   DATALOADER_WORKERS [4]
#   PRECISION          [--bf16] precision flag(s); without a bf16 accelerator the trainer falls back to float32
#   EXTRA_ARGS         [empty]  more train_dpo.py flags, appended to every run
#   OUTPUT_ROOT        [outputs/capybara-benchmark] run logs go to OUTPUT_ROOT/logs, models to OUTPUT_ROOT/<run>
#   KEEP_MODELS        [0]      1 keeps the model each run saves (a 7B model is ~14 GB per run); 0 deletes it
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python}

if [[ -n "${STAND_INS:-}" ]]; then
    if [[ ! -d "$STAND_INS/mistralai/Mistral-7B-Instruct-v0.1" ]]; then
        "$PYTHON" embedded.py stand-ins "$STAND_INS"
    fi
    STAND_INS=$(cd "$STAND_INS" && pwd)
    DATASET=${DATASET:-$STAND_INS/argilla/distilabel-capybara-dpo-7k-binarized}
    MODEL=${MODEL:-$STAND_INS/mistralai/Mistral-7B-Instruct-v0.1}
fi
DATASET=${DATASET:-argilla/distilabel-capybara-dpo-7k-binarized}
MODEL=${MODEL:-mistralai/Mistral-7B-Instruct-v0.1}
LAUNCHER=${LAUNCHER:-auto}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG-configs/zero3.yaml}
RUNS=${RUNS:-baseline sharing sharing+packing}
BATCH_SIZE=${BATCH_SIZE:-4}
PACKED_BATCH_SIZE=${PACKED_BATCH_SIZE:-1}
PACKING_LENGTH=${PACKING_LENGTH:-15872}
MAX_STEPS=${MAX_STEPS:--1}
NUM_EPOCHS=${NUM_EPOCHS:-1}
ATTN=${ATTN:-flex_attention}
LEARNING_RATE=${LEARNING_RATE:-1e-6}
MAX_LENGTH=${MAX_LENGTH:-2842}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-2180}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}
DATALOADER_WORKERS=${DATALOADER_WORKERS:-4}
PRECISION=${PRECISION---bf16}
EXTRA_ARGS=${EXTRA_ARGS:-}
OUTPUT_ROOT=${OUTPUT_ROOT:-outputs/capybara-benchmark}
KEEP_MODELS=${KEEP_MODELS:-0}

if [[ "$LAUNCHER" == auto ]]; then
    # ZeRO-3 over accelerate only makes sense with GPUs; a CPU machine runs the script directly.
    if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        LAUNCHER="accelerate launch"
    else
        LAUNCHER="$PYTHON"
    fi
fi
read -r -a launch <<<"$LAUNCHER"
if [[ "${launch[0]}" == accelerate && -n "$ACCELERATE_CONFIG" ]]; then
    if [[ -f "$ACCELERATE_CONFIG" ]]; then
        launch+=(--config_file "$ACCELERATE_CONFIG")
    else
        echo "note: $ACCELERATE_CONFIG not found; launching accelerate with its default configuration" >&2
    fi
fi

# The paper's command, less what differs between the runs.
read -r -a precision <<<"$PRECISION"
read -r -a extra <<<"$EXTRA_ARGS"
common=(
    --dataset_name="$DATASET" --model_name_or_path="$MODEL"
    --learning_rate "$LEARNING_RATE" --gradient_accumulation_steps 1 --logging_steps 10 --eval_steps 500
    --warmup_steps 20 "${precision[@]}" --logging_first_step --no_remove_unused_columns
    --max_prompt_length "$MAX_PROMPT_LENGTH" --max_length "$MAX_LENGTH"
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" --save_strategy no --dataset_test_split test
    --dataset_train_split train --num_train_epochs "$NUM_EPOCHS" --max_steps "$MAX_STEPS"
    --dataloader_num_workers "$DATALOADER_WORKERS" --attn_implementation "$ATTN" "${extra[@]}"
)

run_flags() {
    local packed="--per_device_train_batch_size $PACKED_BATCH_SIZE --enable_packing --packing_length $PACKING_LENGTH"
    case "$1" in
        baseline) echo "--per_device_train_batch_size $BATCH_SIZE" ;;
        sharing) echo "--per_device_train_batch_size $BATCH_SIZE --prefix_sharing" ;;
        packing) echo "$packed" ;;
        sharing+packing) echo "$packed --prefix_sharing" ;;
        *)
            echo "unknown run '$1' in RUNS (baseline, sharing, packing, sharing+packing)" >&2
            return 1
            ;;
    esac
}

mkdir -p "$OUTPUT_ROOT/logs"
results=()
for run in $RUNS; do
    flags=$(run_flags "$run")
    read -r -a flags <<<"$flags"
    output_dir="$OUTPUT_ROOT/$run"
    log="$OUTPUT_ROOT/logs/$run.log"
    command=("${launch[@]}" train_dpo.py "${common[@]}" "${flags[@]}" --output_dir "$output_dir")
    echo "=== $run: ${command[*]}"
    "${command[@]}" 2>&1 | tee "$log"
    summary=$(sed -n '/^Summary$/,$p' "$log")
    samples=$(awk -F': *' '/^  samples\/s:/ {print $2}' <<<"$summary")
    tokens=$(awk -F': *' '/^  tokens\/s:/ {split($2, a, " "); gsub(",", "", a[1]); print a[1]}' <<<"$summary")
    memory=$(awk -F': *' '/^  peak memory:/ {split($2, a, " "); print a[1] " " a[2]}' <<<"$summary")
    if [[ -z "$samples" ]]; then
        echo "no Summary in $log: did the run fail?" >&2
        exit 1
    fi
    results+=("$run|$samples|$tokens|$memory")
    if [[ "$KEEP_MODELS" != 1 ]]; then
        rm -rf -- "$output_dir"
    fi
done

echo
echo "Capybara benchmark: $MODEL on $DATASET, launched with: ${launch[*]}"
echo
row_format='| %-16s | %9s | %12s | %14s | %20s |\n'
# shellcheck disable=SC2059  # the format is the constant above
printf "$row_format" run samples/s tokens/s "peak memory" "speedup vs baseline"
# shellcheck disable=SC2059
printf "$row_format" ---------------- --------: -----------: -------------: -------------------:
baseline=""
for row in "${results[@]}"; do
    IFS='|' read -r run samples tokens memory <<<"$row"
    if [[ "$run" == baseline ]]; then
        baseline=$samples
    fi
done
for row in "${results[@]}"; do
    IFS='|' read -r run samples tokens memory <<<"$row"
    speedup=$(awk -v s="$samples" -v b="$baseline" 'BEGIN { if (b > 0) printf "%.2fx", s / b; else print "n/a" }')
    # shellcheck disable=SC2059
    printf "$row_format" "$run" "$samples" "$tokens" "$memory" "$speedup"
done
echo
echo "tokens/s counts the tokens standard DPO would compute (prompt twice), so it compares runs on the same work;"
echo "samples/s and tokens/s cover the whole run, first steps included. Logs: $OUTPUT_ROOT/logs/"
