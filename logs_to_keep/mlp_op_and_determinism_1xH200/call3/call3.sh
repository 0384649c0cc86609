# session 29 call 3: the final tree (MLP op with the pruned tiles + one-hot embeddings): GPU tests, bench A/B, the
# determinism check, run.sh seed 0
set -u
t0=$(date +%s)
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out $PWD/data/sp2014 \
    --clusters .carry/data/sp2014_clusters.tsv.xz 2>&1 | tail -1
mkdir -p $OUT/r
tree() {  # /tmp/NAME: the working tree's sources and tests with .carry/NAME's files over them
    rm -rf /tmp/$1 && mkdir -p /tmp/$1/data && cp *.py /tmp/$1/ && cp -r tools tests /tmp/$1/ && cp data/*.py /tmp/$1/data/
    cp data/*.fasta /tmp/$1/data/; if [ -d .carry/$1 ]; then cp .carry/$1/*.py /tmp/$1/; fi
}
timeout 200 python3 -m pytest -v tests/test_triton_kernels.py tests/test_gpu.py -k "relu2 or bit_identical or activation_memory or (compiled_gpu and 1024 and not blocks)" 2>&1 | grep -E "PASS|FAIL|ERROR|passed|failed|rror|assert" | cut -c1-200 | tail -14
echo "tests done at $(( $(date +%s) - t0 )) s"
bench() {  # LABEL TREE
    tree $2; start=$(date +%s)
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 150 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --bench_steps 40 --log_dir $OUT/r/bench_$1 --checkpoint_dir /tmp/ck) > $OUT/r/bench_$1.out 2>&1
    echo "== $1 ($2): rc $? in $(( $(date +%s) - start )) s"
    grep -A12 "^bench:" $OUT/r/bench_$1.out | grep -v "communication" | head -12
    tail -3 $OUT/r/bench_$1.out | grep -i "error"
}
bench base base
bench op_gather v_gather
bench final final
if [ $(( $(date +%s) - t0 )) -lt 330 ]; then bench prefetch v_prefetch; fi
echo "benches done at $(( $(date +%s) - t0 )) s"
det() {  # LABEL TREE
    tree $2
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 60 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --max_steps 300 --val_every 300 --log_every 25 --seed 0 --sample_by_cluster \
        --log_dir $OUT/r/det_$1 --checkpoint_dir /tmp/ck) > $OUT/r/det_$1.out 2>&1
    echo "== det $1 ($2): rc $?"
    grep -hE "^step:" $OUT/r/det_$1/*.txt | sed 's/ train_time.*//' > /tmp/det_$1.txt
    grep -h "val_loss" $OUT/r/det_$1/*.txt | tail -1 | cut -c1-120
}
same() { if cmp -s /tmp/det_$1.txt /tmp/det_$2.txt; then echo "det $1 = $2: the $(wc -l < /tmp/det_$1.txt) step lines are identical"; else echo "det $1 != $2:"; diff /tmp/det_$1.txt /tmp/det_$2.txt | head -4; fi; }
det final1 final; det final2 final; same final1 final2
echo "det done at $(( $(date +%s) - t0 )) s"
if [ $(( $(date +%s) - t0 )) -lt 470 ]; then
    NGPU=1 timeout 75 bash run.sh --seed 0 --log_dir $OUT/r/run_sh > $OUT/r/record_seed0.out 2>&1; echo "run.sh rc $?"
    grep -E "val_loss|compile and|target|trained|rror" $OUT/r/record_seed0.out | cut -c1-160 | tail -7
fi
if [ $(( $(date +%s) - t0 )) -lt 520 ]; then  # the same GPU test on the tree with lookups: it should fail
    tree v_gather; (cd /tmp/v_gather && timeout 60 python3 -m pytest -q tests/test_gpu.py -k bit_identical 2>&1 | grep -E "passed|failed|assert" | head -3)
fi
tar czf $OUT/r.tgz -C $OUT r && rm -r $OUT/r
echo "total $(( $(date +%s) - t0 )) s"
