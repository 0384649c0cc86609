#!/usr/bin/env bash
# Long-track runs from the sources embedded in the record's seed-0 log (tools.records reproduce), back to back, in a
# process session that outlives the device call that starts it (setsid): $RUNS, each NAME:SEED: a seed of the record
# (NAME record) or of a lever (.carry/variants/NAME's files laid over those sources), paired with the record's seeds.
# Issue 25's same-call bench of $VARIANTS runs first if BENCH_FIRST_S (its budget) is set, else in what the runs
# leave of MACHINE_LEFT_S (the seconds the machine is still held for, less a margin). Progress and logs in /tmp/q.
# From the repo root, with the FASTA (valid and test as .xz) and cluster files in .carry/data/, bench25.sh in .carry/:
#   BENCH_FIRST_S=330 RUNS="record:0 polar:0" setsid nohup bash .carry/queue.sh > /dev/null 2>&1 < /dev/null &
set -uo pipefail
export PYTHONUNBUFFERED=1
START=$(date +%s)
Q=/tmp/q; rm -rf $Q /tmp/snap /tmp/repro_*; mkdir -p $Q /tmp/snap
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
bench() {  # BUDGET: issue 25's same-call bench of the tree and $VARIANTS
    echo "$(date +%T) bench25, budget $1 s"
    mkdir -p $Q/bench25
    OUT=$Q/bench25 BUDGET=$1 VARIANTS="${VARIANTS:-graphs graphs_ns}" bash .carry/bench25.sh > $Q/bench25.out 2>&1
}
if [ -n "${BENCH_FIRST_S:-}" ]; then bench "$BENCH_FIRST_S"; fi
for run in ${RUNS:-record:1 record:2}; do  # NAME:SEED, NAME record or a folder of .carry/variants
    name=${run%%:*}; seed=${run##*:}; repro=/tmp/repro_$name
    if [ ! -d $repro ]; then
        CMD=$(python3 -m tools.records reproduce $SEED0 --out $repro | head -1)  # "cd DIR && python train.py ..."
        TRAIN=${CMD#*&& }
        ln -s /tmp/snap/data/sp2014 $repro/data/sp2014  # the logged --data=data/sp2014, unchanged
        if [ $name != record ]; then  # a lever: its files over the record's sources, paired with its seeds
            (cd .carry/variants/$name && find . -type f ! -name WHAT.txt -exec cp --parents {} $repro/ \;)
            echo "overlay $name: $(cd .carry/variants/$name && find . -type f ! -name WHAT.txt)"
        fi
    fi
    echo "$(date +%T) $name seed $seed: cd $repro && $TRAIN --seed=$seed"
    (cd $repro && eval "$TRAIN --seed=$seed --log_dir=$Q/${name}_seed$seed") > $Q/${name}_seed$seed.out 2>&1
    rc=$?; echo "$(date +%T) $name seed $seed: exit $rc"  # $? read before $(date) resets it
done
if [ -z "${BENCH_FIRST_S:-}" ]; then
    BUDGET=$(( ${MACHINE_LEFT_S:-1660} - ($(date +%s) - START) ))
    BUDGET=$(( BUDGET > 450 ? 450 : BUDGET ))
    if [ $BUDGET -gt 200 ]; then bench $BUDGET; fi
fi
echo "$(date +%T) queue done"; touch $Q/done
