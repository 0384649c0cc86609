#!/usr/bin/env bash
# The long track's record command (--normuon, seed 0) on `sprint` made 8 layers deep (a preset of this run only,
# so its log embeds the model.py that defines it), for as many steps as fit the record's 397.78 s of training:
# bench first (the compile is reused by the run), then the run. In a process session that outlives the device call
# (setsid); progress and logs in /tmp/q, collected by ../sp2014-long_normuon_14960_1xH200/poll.sh. From the repo root:
#   EXPECT=COMMIT setsid nohup bash .carry/arm.sh > /dev/null 2>&1 < /dev/null &
set -uo pipefail
export PYTHONUNBUFFERED=1
Q=/tmp/q; rm -rf $Q /tmp/snap; mkdir -p $Q /tmp/snap
cp -a . /tmp/snap/ && cd /tmp/snap && rm -rf logs checkpoints
exec > $Q/queue.txt 2>&1
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
anchor='    "sprint": ModelConfig('
grep -qF "$anchor" model.py || { echo "no sprint preset in model.py"; touch $Q/done; exit 1; }
sed -i "s/^$anchor/    \"sprint8\": ModelConfig(n_layer=8, d_model=512, n_head=4, d_mlp=2048),\n&/" model.py
grep -n '"sprint8"' model.py
LONG="--data data/sp2014 --tokens_per_rank 65536 --preset sprint8 --target_val_loss 2.61 --sample_by_cluster \
    --mask_rate 0.25 --muon_weight_decay 0.005 --normuon --seed 0"
echo "$(date +%T) bench"
python3 train.py $LONG --bench_steps 40 --log_dir $Q/bench > $Q/bench.out 2>&1; echo "$(date +%T) bench: exit $?"
grep -E "^bench|^  " $Q/bench.out | head -12
STEPS=$(python3 -c "import json, glob; r = [json.loads(l) for f in glob.glob('$Q/bench/*.jsonl') for l in open(f)]
print(int(397.78e3 / [x for x in r if 'ms_per_step' in x][-1]['ms_per_step']) // 8 * 8)")
cmd="python3 train.py $LONG --max_steps $STEPS --val_every $((STEPS / 8)) --log_every 100 --log_dir $Q/sprint8"
echo "$(date +%T) $cmd"
eval "$cmd" > $Q/sprint8.out 2>&1
rc=$?; echo "$(date +%T) sprint8 seed 0: exit $rc"
echo "$(date +%T) queue done"; touch $Q/done
