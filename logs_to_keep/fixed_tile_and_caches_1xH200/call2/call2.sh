# session 30 call 2: bench the committed tree (head), FlexAttention's 128x128 forward (flex = working tree) and
# e61bcac (base); flex's 300-step losses; GPU tests of the changes; run.sh seed 0; the forward sweep if time is left
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
bench() {  # LABEL TREE
    tree $2; start=$(date +%s)
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 150 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --bench_steps 40 --log_dir $OUT/r/bench_$1 --checkpoint_dir /tmp/ck) > $OUT/r/bench_$1.out 2>&1
    echo "== $1 ($2): rc $? in $(( $(date +%s) - start )) s"
    grep -A12 "^bench:" $OUT/r/bench_$1.out | grep -v "communication" | head -12
    tail -3 $OUT/r/bench_$1.out | grep -i "error"
}
bench head v_noflex
bench flex flex
bench base base
if [ $(( $(date +%s) - t0 )) -lt 300 ]; then bench head2 v_noflex; fi
echo "benches done at $(( $(date +%s) - t0 )) s"
(timeout 200 python3 -m pytest -v tests/test_triton_kernels.py tests/test_gpu.py -k "relu2 or (compiled_gpu and model-1024) or bit_identical" > $OUT/r/pytest.txt 2>&1; echo "pytest rc $?" >> $OUT/r/pytest.txt) &
tests=$!
PYTHONUNBUFFERED=1 timeout 150 python3 train.py --data data/sp2014 --preset sprint --tokens_per_rank 65536 \
    --max_steps 300 --val_every 300 --log_every 25 --seed 0 --sample_by_cluster --log_dir $OUT/r/det_flex \
    --checkpoint_dir /tmp/ck_flex > $OUT/r/det_flex.out 2>&1
echo "== det flex: rc $? at $(( $(date +%s) - t0 )) s"
grep -hE "^step:" $OUT/r/det_flex/*.txt | sed 's/ train_time.*//' | tr '\n' ' ' | cut -c1-1200; echo
wait $tests
grep -E "PASS|FAIL|ERROR|passed|failed|rc " $OUT/r/pytest.txt | cut -c1-160 | tail -12
echo "tests done at $(( $(date +%s) - t0 )) s"
NGPU=1 timeout 100 bash run.sh --seed 0 --log_dir $OUT/r/run_sh > $OUT/r/record_seed0.out 2>&1; echo "run.sh rc $?"
grep -E "val_loss|compile and|target|trained|rror" $OUT/r/record_seed0.out | cut -c1-160 | tail -7
left=$(( 575 - $(date +%s) + t0 ))
if [ $left -gt 40 ]; then PYTHONUNBUFFERED=1 timeout $left python3 .carry/attn_sweep.py . .carry/data/sp2014_valid.fasta 2>&1 | grep -v Warning | tee $OUT/r/attn_sweep2.txt; fi
tar czf $OUT/r.tgz -C $OUT r && rm -r $OUT/r
echo "total $(( $(date +%s) - t0 )) s"
