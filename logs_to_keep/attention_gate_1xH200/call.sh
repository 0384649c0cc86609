#!/usr/bin/env bash
# Track sp2014's record command (the short track, seeds 0 and 1) on HEAD's tree and on a copy with attn_gate.patch
# applied, a pair per seed in one call; logs straight to $OUT, so that runs finished before the call's limit come
# back. Data from .carry/data/ as in ../sp2014-long_normuon_14960_1xH200/attempt.sh. From the repo root:
#   bash logs_to_keep/attention_gate_1xH200/call.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
exec > >(tee $OUT/call.txt) 2>&1
git checkout -q -- . && [ -z "$(git status --porcelain --untracked-files=no)" ] || {
    echo "the tree is not HEAD's"; exit 1; }
date; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv; git log --oneline -1
python3 -c "import lzma, shutil; [shutil.copyfileobj(lzma.open(f'.carry/data/sp2014_{s}.fasta.xz'), \
    open(f'.carry/data/sp2014_{s}.fasta', 'wb')) for s in ('valid', 'test')]"
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out data/sp2014 | tail -1
rm -rf /tmp/gate && mkdir /tmp/gate && git ls-files -z | xargs -0 cp --parents -t /tmp/gate && cp -a .git /tmp/gate/ \
    && ln -s "$PWD/data/sp2014" /tmp/gate/data/sp2014 \
    && (cd /tmp/gate && git apply "$OLDPWD/logs_to_keep/attention_gate_1xH200/attn_gate.patch") || { echo "no patched copy"; exit 1; }
SHORT="--data data/sp2014 --tokens_per_rank 65536 --preset sprint --max_steps 700 --val_every 140"
SHORT="$SHORT --target_val_loss 2.78"
for seed in 0 1; do
    for arm in base gate; do
        dir=$PWD; [ $arm = gate ] && dir=/tmp/gate
        echo "$(date +%T) $arm seed $seed"
        run=$OUT/${arm}_seed$seed
        (cd $dir && python3 train.py $SHORT --seed $seed --log_dir $run > $run.out 2>&1)
        rc=$?; echo "$(date +%T) $arm seed $seed: exit $rc; $(tail -2 $run.out | head -1 | cut -c1-60)"
    done
done
