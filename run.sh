#!/usr/bin/env bash
# The main job. On a GPU host: the record run of a track (data/tracks.py), its data built first if missing. On a host
# without a GPU: a CPU demo of about 3 minutes on the sample shipped in data/. Extra arguments go to train.py.
#   bash run.sh                        # track sp2014's record on every GPU of this host
#   NGPU=1 bash run.sh --seed 1        # on one of them, another seed
#   TRACK=sp2014-long bash run.sh      # another track (python data/tracks.py lists them)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
NGPU=${NGPU:-$( (nvidia-smi --list-gpus 2>/dev/null || true) | wc -l)}
case "$NGPU" in
    ''|*[!0-9]*) echo "run.sh: NGPU must be a number of GPUs, got '$NGPU'" >&2; exit 1 ;;
esac
# What training needs. torch only where it is missing (the GPU hosts hold their CUDA build); without a GPU the
# pinned release, whose CPU build this machine's pip finds (elsewhere see README.md for the CPU index).
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    if [ "$NGPU" -eq 0 ]; then "$PYTHON" -m pip install -q torch==2.13.0; else "$PYTHON" -m pip install -q "torch>=2.11"; fi
fi
"$PYTHON" -c "import numpy, huggingface_hub" 2>/dev/null || "$PYTHON" -m pip install -q "numpy>=1.26" "huggingface_hub>=0.30"

if [ "$NGPU" -eq 0 ]; then
    echo "run.sh: no GPU here, so a CPU demo (about 3 minutes on 2 cores): the 'tiny' model on 1,800 of the 2,000"
    echo "        sequences in data/swissprot2014_sample.fasta, validated on 100 others"
    [ -f data/sample/manifest.json ] || "$PYTHON" data/prepare.py --fasta data/swissprot2014_sample.fasta \
        --out data/sample --name sample --num_valid 100 --num_test 100
    "$PYTHON" train.py --data data/sample --preset tiny --tokens_per_rank 2048 --max_len 512 --window_start 512 \
        --max_steps 600 --val_every 150 --log_every 50 --muon_lr 0.03 --embed_lr 0.1 --num_workers 1 "$@"
    echo "run.sh: on a GPU host, bash run.sh trains track sp2014's record instead: the 19M-parameter 'sprint'"
    echo "        model on 133M tokens of Swiss-Prot 2014 to validation loss 2.78 in about 20 s of training."
    exit
fi

eval "$("$PYTHON" data/tracks.py "${TRACK:-sp2014}")"
if [ $((TRACK_GLOBAL_BATCH % (NGPU * 1024))) -ne 0 ]; then
    echo "run.sh: $NGPU GPUs cannot share the record's $TRACK_GLOBAL_BATCH-token batch evenly; set NGPU to 1, 2, 4 or 8" >&2
    exit 1
fi
DATA=${DATA:-$TRACK_DATA}
SOURCE=${SOURCE:-../shared/data}
if [ ! -f "$DATA/manifest.json" ]; then
    echo "run.sh: track $TRACK_NAME's data are missing in $DATA: building them"
    # the split files, with each training document's cluster for --sample_by_cluster
    if [[ "$TRACK_NAME" == sp2014* && -f "$SOURCE/sp2014_train.fasta.xz" && -f "$SOURCE/sp2014_clusters.tsv.xz" ]]; then
        "$PYTHON" data/prepare.py --train "$SOURCE/sp2014_train.fasta.xz" --valid "$SOURCE/sp2014_valid.fasta" \
            --test "$SOURCE/sp2014_test.fasta" --clusters "$SOURCE/sp2014_clusters.tsv.xz" --name sp2014 --out "$DATA"
    else
        ${TRACK_BUILD/#python /$PYTHON } --out "$DATA"  # the track's public recipe, with this script's Python
    fi
fi
TOKENS_PER_RANK=$((TRACK_GLOBAL_BATCH / NGPU < 65536 ? TRACK_GLOBAL_BATCH / NGPU : 65536))
# shellcheck disable=SC2206  # the record's flags are words
ARGS=(--standalone --nproc_per_node="$NGPU" train.py --data "$DATA" $TRACK_RECORD
      --tokens_per_rank "$TOKENS_PER_RANK" --grad_accum $((TRACK_GLOBAL_BATCH / NGPU / TOKENS_PER_RANK)) "$@")
SHOWN=$(printf '%q ' "$PYTHON" -m torch.distributed.run "${ARGS[@]}")  # quoted: it can be pasted as it is
echo "run.sh: track $TRACK_NAME's record on $NGPU GPU(s): ${SHOWN% }"
# torchrun, as this script's Python runs it (a bare torchrun may be another environment's, or not on PATH), with one
# line instead of the launcher's traceback when a rank fails: train.py has already said why
exec "$PYTHON" -c 'import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    rank, failure = e.get_first_failure()
    signal = f" ({failure.signal_name()})" if failure.exitcode < 0 else ""
    sys.exit(f"run.sh: rank {rank} stopped first, exit code {failure.exitcode}{signal}")' "${ARGS[@]}"
