#!/usr/bin/env bash
# Fine-tunes SmolLM2-135M-Instruct (the GGUF of scripts/fetch_smollm2.sh) on the bundled corpus on the
# CPU, then exports the result as a Hugging Face model:
#   1. lmforge import   the GGUF -> an lmforge checkpoint (weights, tokenizer, chat template)
#   2. lmforge prepare  the bundled corpus with SmolLM2's tokenizer
#   3. lmforge train    --init-from the import, 50 steps (B=4, T=128, lr 1e-4)
#   4. lmforge export   --to hf; with PYTHON set to a Python that has transformers, the export is loaded
#                       as LlamaForCausalLM and its greedy continuation compared with lmforge's
#
#   scripts/finetune_smollm2.sh [OUT_DIR]        (default out/smollm2; STEPS=50, LMF=build/lmforge)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/smollm2}
steps=${STEPS:-50}
lmf=${LMF:-build/lmforge}
gguf=$(scripts/fetch_smollm2.sh | tail -1)
[ -x "$lmf" ] || { echo "no $lmf: build first (scripts/build.sh)" >&2; exit 1; }
mkdir -p "$out"
"$lmf" import --from "$gguf" --out "$out/imported" --overwrite
"$lmf" prepare --input data/kjv.txt --tokenizer "$out/imported/tokenizer.json" --out-dir "$out/data" --name kjv
"$lmf" train --init-from "$out/imported" --data "$out/data/kjv_train.bin" --steps "$steps" -B 4 -T 128 --lr 1e-4 \
  --warmup 5 --device cpu --out-dir "$out/run" --overwrite --log-every 5 --eval-every 25 --eval-batches 4
"$lmf" export --to hf --checkpoint "$out/run" --out "$out/hf" --overwrite
if [ -n "${PYTHON:-}" ]; then
  prompt="And God said unto Moses"
  "$lmf" generate --checkpoint "$out/run" --prompt "$prompt" -n 24 --temperature 0 --device cpu 2>/dev/null >"$out/greedy_lmforge.txt"
  "$PYTHON" - "$out/hf" "$prompt" "$out/greedy_lmforge.txt" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, prompt, ours = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().rstrip("\n")
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
t = AutoTokenizer.from_pretrained(d)
ids = t(prompt, return_tensors="pt").input_ids
text = t.decode(m.generate(ids, max_new_tokens=24, do_sample=False)[0])
print(f"transformers loads the export as {type(m).__name__}; greedy 24 tokens identical to lmforge's: {text == ours}")
print(repr(text))
sys.exit(0 if text == ours else 1)
PY
fi
