# session 29 call 2: the matmul_relu2 kernel's launch configurations; bench base / op with the wide autotune list /
# op + one-hot embeddings; determinism: two 300-step runs of the tree, two of the one-hot variant
set -u
t0=$(date +%s)
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out $PWD/data/sp2014 \
    --clusters .carry/data/sp2014_clusters.tsv.xz 2>&1 | tail -1
mkdir -p $OUT/r
tree() {  # /tmp/NAME: the working tree's sources with .carry/NAME's files over them
    rm -rf /tmp/$1 && mkdir -p /tmp/$1/data && cp *.py /tmp/$1/ && cp -r tools /tmp/$1/ && cp data/*.py /tmp/$1/data/
    if [ -d .carry/$1 ]; then cp .carry/$1/*.py /tmp/$1/; fi
}
timeout 150 python3 .carry/mlp_sweep.py > $OUT/r/mlp_sweep.txt 2>&1; echo "sweep rc $?"; cut -c1-190 $OUT/r/mlp_sweep.txt | head -40
echo "sweep done at $(( $(date +%s) - t0 )) s"
bench() {  # LABEL TREE
    tree $2; start=$(date +%s)
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 200 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --bench_steps 40 --log_dir $OUT/r/bench_$1 --checkpoint_dir /tmp/ck) > $OUT/r/bench_$1.out 2>&1
    echo "== $1 ($2): rc $? in $(( $(date +%s) - start )) s"
    grep -A14 "^bench:" $OUT/r/bench_$1.out | grep -v "communication" | head -14
    tail -3 $OUT/r/bench_$1.out | grep -i "error"
}
bench base base
bench mlp_op new
bench one_hot v_det2
echo "benches done at $(( $(date +%s) - t0 )) s"
det() {  # LABEL TREE
    tree $2
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 80 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --max_steps 300 --val_every 300 --log_every 25 --seed 0 --sample_by_cluster \
        --log_dir $OUT/r/det_$1 --checkpoint_dir /tmp/ck) > $OUT/r/det_$1.out 2>&1
    echo "== det $1 ($2): rc $?"
    grep -hE "^step:" $OUT/r/det_$1/*.txt | sed 's/ train_time.*//' > /tmp/det_$1.txt
    grep -h "val_loss" $OUT/r/det_$1/*.txt | tail -1 | cut -c1-120
}
same() { if cmp -s /tmp/det_$1.txt /tmp/det_$2.txt; then echo "det $1 = $2: the $(wc -l < /tmp/det_$1.txt) step lines are identical"; else echo "det $1 != $2:"; diff /tmp/det_$1.txt /tmp/det_$2.txt | head -4; fi; }
det tree1 new; det tree2 new; same tree1 tree2
if [ $(( $(date +%s) - t0 )) -lt 460 ]; then det onehot1 v_det2; det onehot2 v_det2; same onehot1 onehot2; fi
tar czf $OUT/r.tgz -C $OUT r && rm -r $OUT/r
echo "total $(( $(date +%s) - t0 )) s"
