#!/usr/bin/env bash
# Runs of the tree's train.py back to back, in a process session that outlives the device call that starts it
# (setsid); progress and logs in /tmp/q. $RUNS: NAME:SEED items; NAME picks the flags below. Data are built first
# from the FASTA (valid and test as .xz) and cluster files in .carry/data/. From the repo root:
#   EXPECT=COMMIT RUNS="long:0" setsid nohup bash .carry/attempt.sh > /dev/null 2>&1 < /dev/null &
set -uo pipefail
export PYTHONUNBUFFERED=1
Q=/tmp/q; rm -rf $Q /tmp/snap; mkdir -p $Q /tmp/snap
cp -a . /tmp/snap/ && cd /tmp/snap && rm -rf logs checkpoints
exec > $Q/queue.txt 2>&1
# Tracked files left out of the copy to keep it under the carry limit come back from git: the runs are HEAD's tree.
# The machine's .git is the session's first checkout, so a commit made since is not HEAD there: $EXPECT (a commit,
# optional) stops the queue unless it is.
git checkout -q -- . && [ -z "$(git status --porcelain --untracked-files=no)" ] || { git status --short | head; \
    echo "the tree is not HEAD's"; touch $Q/done; exit 1; }
[ -z "${EXPECT:-}" ] || [ "$(git rev-parse HEAD)" = "$(git rev-parse "$EXPECT^{commit}" 2>/dev/null)" ] || {
    echo "HEAD here is $(git rev-parse --short HEAD), not $EXPECT"; touch $Q/done; exit 1; }
date; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; git log --oneline -1
python3 -c "import lzma, shutil; [shutil.copyfileobj(lzma.open(f'.carry/data/sp2014_{s}.fasta.xz'), \
    open(f'.carry/data/sp2014_{s}.fasta', 'wb')) for s in ('valid', 'test')]"  # carried as .xz: 64 MiB
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out data/sp2014 \
    --clusters .carry/data/sp2014_clusters.tsv.xz | tail -3
LONG="--preset sprint8 --max_steps 10700 --val_every 1870 --target_val_loss 2.61 --sample_by_cluster --log_every 100 \
    --mask_rate 0.25 --muon_weight_decay 0.005 --normuon"  # the record command with sprint8 and 10,700 steps
for run in $RUNS; do
    name=${run%%:*}; seed=${run##*:}
    case $name in
        long) flags=$LONG ;;
        *) echo "unknown run $name"; continue ;;
    esac
    cmd="python3 train.py --data data/sp2014 --tokens_per_rank 65536 $flags --seed $seed --log_dir $Q/${name}_seed$seed"
    echo "$(date +%T) $cmd"
    eval "$cmd" > $Q/${name}_seed$seed.out 2>&1
    rc=$?; echo "$(date +%T) $name seed $seed: exit $rc"  # $? read before $(date) resets it
done
echo "$(date +%T) queue done"; touch $Q/done
