#!/usr/bin/env bash
# The canonical sp2014 record run: a global batch of 524,288 tokens = 8 micro-batches of 65,536 tokens, spread over
# the GPUs of this host (8 GPUs: 1 each; 1 GPU: 8 accumulated). Extra arguments go to train.py.
#   bash run.sh                      # all GPUs of this host
#   NGPU=2 bash run.sh --seed 1      # two of them, another seed
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/sp2014}
SOURCE=${SOURCE:-../shared/data}
if [ ! -f "$DATA/manifest.json" ]; then
    python data/prepare.py --train "$SOURCE/sp2014_train.fasta.xz" --valid "$SOURCE/sp2014_valid.fasta" \
        --test "$SOURCE/sp2014_test.fasta" --name sp2014 --out "$DATA"
fi
NGPU=${NGPU:-$(nvidia-smi --list-gpus | wc -l)}
MICRO_BATCHES=8
if [ "$NGPU" -lt 1 ] || [ $((MICRO_BATCHES % NGPU)) -ne 0 ]; then
    echo "run.sh: $NGPU GPUs cannot share the record's $MICRO_BATCHES micro-batches evenly; set NGPU to 1, 2, 4 or 8" >&2
    exit 1
fi
exec torchrun --standalone --nproc_per_node="$NGPU" train.py --data "$DATA" --tokens_per_rank 65536 \
    --grad_accum $((MICRO_BATCHES / NGPU)) --max_steps 200 --val_every 10 --target_val_loss 2.78 "$@"
