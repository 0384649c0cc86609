#!/usr/bin/env bash
# One long-track arm in one device call: bench the model (cold compile, reused by the run), then as many steps as
# fit before END_S seconds of this call, sampling by cluster. Usage: bash .carry/arm.sh ARM PRESET "SPEC|-" [SEED]
set -uo pipefail
START=$(date +%s)
ARM=$1; PRESET=$2; SPEC=$3; SEED=${4:-0}; END_S=${END_S:-575}; MAX_TRAIN_S=${MAX_TRAIN_S:-390}
mkdir -p "$OUT/$ARM"
exec > >(tee "$OUT/$ARM/call.txt") 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
if [ ! -f data/sp2014/manifest.json ]; then
    python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
        --test .carry/data/sp2014_test.fasta --name sp2014 --out "$PWD/data/sp2014" \
        --clusters .carry/data/sp2014_clusters.tsv.xz | tail -3
fi
if [ "$SPEC" != "-" ]; then  # a preset of this arm only: the run's log embeds the model.py that defines it
    python3 - "$PRESET" "$SPEC" <<'EOF'
import sys, re
name, spec = sys.argv[1:]
src = open("model.py").read()
anchor = '    "sprint": ModelConfig('
assert anchor in src
if f'"{name}": ModelConfig(' in src:
    sys.exit()
src = src.replace(anchor, f'    "{name}": ModelConfig({spec}),\n' + anchor, 1)
open("model.py", "w").write(src)
EOF
    grep -n "\"$PRESET\"" model.py
fi
COMMON=(--data data/sp2014 --preset "$PRESET" --tokens_per_rank 65536 --seed "$SEED" --sample_by_cluster)
rm -rf logs; mkdir -p logs
python3 train.py "${COMMON[@]}" --bench_steps 40 --log_dir logs/bench 2>&1 | grep -v "^  " | tail -25
STEP_MS=$(python3 -c "import json,glob; r=[json.loads(l) for f in glob.glob('logs/bench/*.jsonl') for l in open(f)]; print([x for x in r if 'ms_per_step' in x][-1]['ms_per_step'])")
NOW=$(( $(date +%s) - START ))
STEPS=$(python3 -c "s=min($MAX_TRAIN_S, $END_S - $NOW - 70); n=int(s*1000/$STEP_MS)//8*8; print(n)")
echo "arm $ARM: $STEP_MS ms/step after ${NOW}s of this call -> $STEPS steps"
timeout $(( END_S - NOW + 15 )) python3 train.py "${COMMON[@]}" --max_steps "$STEPS" --val_every $((STEPS / 8)) \
    --log_every 100 --log_dir logs/run 2>&1 | grep -v "^  " | grep -v "^step:.*[1-9]00/.*train_loss:[0-9.]* train_time" | tail -40
cp logs/bench/*.jsonl logs/bench/*.txt "$OUT/$ARM/" 2>/dev/null; mkdir -p "$OUT/$ARM/run"; cp logs/run/* "$OUT/$ARM/run/"
echo "call took $(( $(date +%s) - START ))s"
