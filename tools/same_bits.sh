#!/usr/bin/env bash
# tools/same_bits.sh: the refactor check of docs/ARCHITECTURE.md ("same bits"). Runs short training runs
# with one lmforge binary and prints, per run, every logged loss (exact, as metrics.jsonl stores them)
# and (CPU runs) the SHA-256 of the final checkpoint's files. Run it with the binaries before and after a change
# and diff the two outputs: a refactor that keeps the numerics prints the same text.
#
#   tools/same_bits.sh cpu BIN OUT_DIR   # tiny, test-llama, tiny-moe: 50 steps each on the CPU
#   tools/same_bits.sh gpu BIN OUT_DIR   # GPT-2 124M and moe-bench: 20 steps each, --cuda-graph on and off
set -euo pipefail
mode=$1 bin=$2 out=$3
mkdir -p "$out"
run() {  # tag, then lmforge train flags
  local tag=$1; shift
  rm -rf "${out:?}/$tag"
  "$bin" train "$@" --out-dir "$out/$tag" >"$out/$tag.log" 2>&1 || { echo "$tag: FAILED"; tail -3 "$out/$tag.log"; return 1; }
  python3 - "$out/$tag" "$tag" <<'PY'
import json, sys
d, tag = sys.argv[1], sys.argv[2]
recs = [json.loads(l) for l in open(d + "/metrics.jsonl")]
vals = ["%s:%r" % (r["step"], r.get("loss", r.get("val_loss"))) for r in recs if "loss" in r or "val_loss" in r]
print("%s losses %s" % (tag, " ".join(vals)))
PY
  local ck
  ck=$(cat "$out/$tag/checkpoints/latest")
  if [ "$mode" = cpu ]; then
    (cd "$out/$tag/checkpoints/$ck" && sha256sum model.safetensors optimizer.safetensors | sed "s/^/$tag sha256 /")
  fi
  rm -rf "$out/$tag/checkpoints"  # GPU checkpoints are GBs; the CPU ones are hashed above
}
case $mode in
  cpu)
    # test-llama's vocabulary has 61 tokens: its data is the bundled corpus's bytes modulo 61 (llm.c shards)
    python3 - "$out" <<'PY'
import struct, sys
text = open("data/kjv.txt", "rb").read()[:400000]
ids = [b % 61 for b in text]
for name, part in (("train", ids[:360000]), ("val", ids[360000:])):
    with open("%s/mod61_%s.bin" % (sys.argv[1], name), "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, len(part), *([0] * 253)))
        f.write(struct.pack("<%dH" % len(part), *part))
PY
    common=(--device cpu -B 4 --steps 50 --lr 1e-3 --warmup 5 --log-every 1 --eval-every 25 --eval-batches 2)
    run tiny --preset tiny "${common[@]}"
    run test-llama --preset test-llama --data "$out/mod61_train.bin" --val-data "$out/mod61_val.bin" "${common[@]}"
    run tiny-moe --preset tiny-moe "${common[@]}" ;;
  gpu)
    for g in on off; do
      run "gpt2_graph_$g" --device cuda --preset gpt2-124m -B 16 -T 1024 --steps 20 --log-every 1 --eval-batches 1 \
        --cuda-graph "$g"
      run "moe_graph_$g" --device cuda --preset moe-bench -B 8 -T 2048 --steps 20 --log-every 1 --eval-batches 1 \
        --cuda-graph "$g"
    done ;;
  *) echo "usage: tools/same_bits.sh cpu|gpu BIN OUT_DIR" >&2; exit 2 ;;
esac
