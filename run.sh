#!/usr/bin/env bash
# The canonical sp2014 record run: the `sprint` model (6 layers of 512), a global batch of 65,536 tokens per step
# split over the GPUs of this host, 700 steps. The schedule is sized so that the run ends just below the target
# (validation loss 2.78): the final loss of several seeds is what `tools.records check` tests. Extra arguments go to
# train.py.
#   bash run.sh                      # all GPUs of this host
#   NGPU=1 bash run.sh --seed 1      # one of them, another seed
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data/sp2014}
SOURCE=${SOURCE:-../shared/data}
if [ ! -f "$DATA/manifest.json" ]; then
    python data/prepare.py --train "$SOURCE/sp2014_train.fasta.xz" --valid "$SOURCE/sp2014_valid.fasta" \
        --test "$SOURCE/sp2014_test.fasta" --name sp2014 --out "$DATA"
fi
NGPU=${NGPU:-$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)}
GLOBAL_BATCH=65536
case "$NGPU" in
    *[!0-9]*) echo "run.sh: NGPU must be a number of GPUs, got '$NGPU'" >&2; exit 1 ;;
esac
if [ "$NGPU" -eq 0 ]; then
    echo "run.sh: no GPU found (nvidia-smi lists none); the record runs on 1, 2, 4 or 8 GPUs (NGPU=n)" >&2
    exit 1
fi
if [ $((GLOBAL_BATCH % (NGPU * 1024))) -ne 0 ]; then
    echo "run.sh: $NGPU GPUs cannot share the record's $GLOBAL_BATCH-token batch evenly; set NGPU to 1, 2, 4 or 8" >&2
    exit 1
fi
TOKENS_PER_RANK=$((GLOBAL_BATCH / NGPU < 65536 ? GLOBAL_BATCH / NGPU : 65536))
exec torchrun --standalone --nproc_per_node="$NGPU" train.py --data "$DATA" --preset sprint \
    --tokens_per_rank $TOKENS_PER_RANK --grad_accum $((GLOBAL_BATCH / NGPU / TOKENS_PER_RANK)) \
    --max_steps 700 --val_every 140 --target_val_loss 2.78 "$@"
