# session 29 call 1: the ReLU² MLP op (issue 25): GPU tests, bench A/B/A, run.sh seed 0; then the determinism check
set -u
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out $PWD/data/sp2014 \
    --clusters .carry/data/sp2014_clusters.tsv.xz 2>&1 | tail -1
mkdir -p $OUT/r
tree() {  # /tmp/NAME: the working tree's sources with .carry/NAME's files over them
    rm -rf /tmp/$1 && mkdir -p /tmp/$1/data && cp *.py /tmp/$1/ && cp -r tools /tmp/$1/ && cp data/*.py /tmp/$1/data/
    if [ -d .carry/$1 ]; then cp .carry/$1/*.py /tmp/$1/; fi
}
timeout 150 python3 -m pytest -q tests/test_triton_kernels.py 2>&1 | tail -3
echo "op tests done at $(( $(date +%s) - t0 )) s"
bench() {  # LABEL TREE
    tree $2; start=$(date +%s)
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 200 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --bench_steps 40 --log_dir $OUT/r/bench_$1 --checkpoint_dir /tmp/ck) > $OUT/r/bench_$1.out 2>&1
    echo "== $1 ($2): rc $? in $(( $(date +%s) - start )) s"
    grep -A16 "^bench:" $OUT/r/bench_$1.out | head -17
    tail -3 $OUT/r/bench_$1.out | grep -i "error"
}
bench base base
bench mlp_op new
bench base2 base
echo "benches done at $(( $(date +%s) - t0 )) s"
NGPU=1 timeout 100 bash run.sh --seed 0 --log_dir $OUT/r/run_sh > $OUT/r/record_seed0.out 2>&1; echo "run.sh rc $?"
grep -E "val_loss|compile and|target|trained|rror" $OUT/r/record_seed0.out | cut -c1-160 | tail -8
echo "run.sh done at $(( $(date +%s) - t0 )) s"
tree v_det
det() {  # LABEL
    (cd /tmp/v_det && PYTHONUNBUFFERED=1 timeout 100 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --max_steps 300 --val_every 300 --log_every 25 --seed 0 --sample_by_cluster \
        --log_dir $OUT/r/det_$1 --checkpoint_dir /tmp/ck) > $OUT/r/det_$1.out 2>&1
    echo "== det $1: rc $?"; grep -iE "warn|nondetermin" $OUT/r/det_$1.out | sort | uniq -c | cut -c1-200 | head -8
}
if [ $(( $(date +%s) - t0 )) -lt 430 ]; then
    det a; det b
    for x in a b; do grep -hE "^step:" $OUT/r/det_$x/*.txt | sed 's/ train_time.*//' > /tmp/det_$x.txt; grep -h "val_loss" $OUT/r/det_$x/*.txt | tail -1 | cut -c1-120; done
    if cmp -s /tmp/det_a.txt /tmp/det_b.txt; then echo "det: the two runs' $(wc -l < /tmp/det_a.txt) train_loss lines are identical"; else echo "det: they differ:"; diff /tmp/det_a.txt /tmp/det_b.txt | head -6; fi
fi
tar czf $OUT/r.tgz -C $OUT r && rm -r $OUT/r
echo "total $(( $(date +%s) - t0 )) s"
