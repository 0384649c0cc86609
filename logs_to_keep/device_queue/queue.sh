#!/usr/bin/env bash
# Runs an experiment's runs file (bash, sourced: `run NAME COMMAND...` lines, each command's output in
# /tmp/q/NAME.out and its exit status in /tmp/q/queue.txt) from a snapshot of the tree, in a process session that
# outlives the device call that starts it (setsid); /tmp/q/done when all have run. First it builds the sp2014 shards
# (data/sp2014 of the snapshot) from the FASTA (valid and test as .xz) and cluster files in .carry/data/. From the
# repo root, with this script and poll.sh (../sp2014-long_normuon_14960_1xH200/) copied to .carry/:
#   EXPECT=COMMIT setsid nohup bash .carry/queue.sh RUNS_FILE > /dev/null 2>&1 < /dev/null &
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
run() {  # NAME COMMAND...
    local name=$1; shift
    echo "$(date +%T) $name: $*"
    "$@" > $Q/$name.out 2>&1
    local rc=$?; echo "$(date +%T) $name: exit $rc"  # $? read before $(date) resets it
}
source "$1"  # the snapshot's copy (paths from the repo root)
echo "$(date +%T) queue done"; touch $Q/done
