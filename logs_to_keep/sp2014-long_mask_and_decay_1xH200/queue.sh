#!/usr/bin/env bash
# Long-track arms back to back, from a snapshot of the tree, in a process session that outlives the device call
# that starts it (setsid). Each arm: 19,800 steps of sprint sampling by cluster. Progress and logs in /tmp/q.
# (Its exit lines read $? after $(date) had reset it when it ran; fixed since. The runs' logs show their ends.)
set -uo pipefail
Q=/tmp/q; rm -rf $Q /tmp/snap; mkdir -p $Q /tmp/snap
cp -a . /tmp/snap/ && cd /tmp/snap && rm -rf logs checkpoints
exec > $Q/queue.txt 2>&1
date; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out "$PWD/data/sp2014" \
    --clusters .carry/data/sp2014_clusters.tsv.xz | tail -3
run_arm() {  # NAME, then the arm's own flags
    local name=$1; shift
    echo "$(date +%T) arm $name: $*"
    PYTHONUNBUFFERED=1 python3 train.py --data data/sp2014 --preset sprint --tokens_per_rank 65536 --max_steps 19800 \
        --val_every 1870 --target_val_loss 2.61 --sample_by_cluster --log_every 100 --log_dir $Q/$name "$@" \
        > $Q/$name.out 2>&1
    local rc=$?; echo "$(date +%T) arm $name: exit $rc"  # $? read before $(date) resets it
}
run_arm mask25 --seed 0 --mask_rate 0.25
run_arm mask25_wd --seed 0 --mask_rate 0.25 --muon_weight_decay 0.005
echo "$(date +%T) queue done"; touch $Q/done
