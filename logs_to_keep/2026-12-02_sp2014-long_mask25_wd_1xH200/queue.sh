#!/usr/bin/env bash
# Record seeds of the long track, back to back, in a process session that outlives the device call that starts it
# (setsid), each from the sources embedded in the seed-0 log (tools.records reproduce), so that `check` finds one
# set of sources; then a GPU test of the bench's kernel launchers and, in what is left of the machine, the same-call
# bench of issue 25. Progress and logs in /tmp/q. From the repo root, with the FASTA (valid and test as .xz, to stay
# under the device's 64 MiB carry) and cluster files in .carry/data/, and bench25.sh (from
# ../one_hot_pad_and_value_fold_1xH200/) and the bench's variants in .carry/:
#   SEEDS="3 4" MACHINE_LEFT_S=1620 setsid nohup bash queue.sh > /dev/null 2>&1 < /dev/null &
# MACHINE_LEFT_S: the seconds the machine is still held for, less a margin; the bench gets what the seeds leave.
# Seeds 1 and 2 ran from an earlier version of this script (no GPU test, plain valid/test FASTA, the vefold bench;
# seed 0's log then lay in ../sp2014-long_mask_and_decay_1xH200/mask25_wd/); seeds 3 and 4 from this one.
set -uo pipefail
export PYTHONUNBUFFERED=1
START=$(date +%s)
Q=/tmp/q; rm -rf $Q /tmp/snap /tmp/repro; mkdir -p $Q /tmp/snap
cp -a . /tmp/snap/ && cd /tmp/snap && rm -rf logs checkpoints
exec > $Q/queue.txt 2>&1
date; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 -c "import lzma, shutil; [shutil.copyfileobj(lzma.open(f'.carry/data/sp2014_{s}.fasta.xz'), \
    open(f'.carry/data/sp2014_{s}.fasta', 'wb')) for s in ('valid', 'test')]"  # carried as .xz: 64 MiB
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out "$PWD/data/sp2014" \
    --clusters .carry/data/sp2014_clusters.tsv.xz | tail -3
SEED0=logs_to_keep/2026-12-02_sp2014-long_mask25_wd_1xH200/ec22564e-c9a6-4b1e-b27f-3ebca14a091e.txt
CMD=$(python3 -m tools.records reproduce $SEED0 --out /tmp/repro | head -1)
ln -s /tmp/snap/data/sp2014 /tmp/repro/data/sp2014  # the logged --data=data/sp2014, unchanged
echo "$CMD"
for seed in ${SEEDS:-1 2}; do
    echo "$(date +%T) seed $seed"
    (eval "$CMD --seed=$seed --log_dir=$Q/seed$seed") > $Q/seed$seed.out 2>&1  # CMD starts with a cd
    rc=$?; echo "$(date +%T) seed $seed: exit $rc"  # $? read before $(date) resets it
done
timeout 150 python3 -m pytest -q tests/test_train.py -k launched > $Q/gputest.out 2>&1  # the bench's launchers
BUDGET=$(( ${MACHINE_LEFT_S:-1660} - ($(date +%s) - START) ))
BUDGET=$(( BUDGET > 450 ? 450 : BUDGET ))
if [ $BUDGET -gt 200 ]; then
    echo "$(date +%T) bench25, budget $BUDGET s"
    mkdir -p $Q/bench25
    OUT=$Q/bench25 BUDGET=$BUDGET VARIANTS="${VARIANTS:-nsmerge bwdtile bwdtile_hfirst}" bash .carry/bench25.sh > $Q/bench25.out 2>&1
fi
echo "$(date +%T) queue done"; touch $Q/done
