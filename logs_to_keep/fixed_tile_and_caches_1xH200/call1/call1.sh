# session 30 call 1: FlexAttention options sweep (quiet GPU), then the final tree's GPU tests beside two same-seed runs
set -u
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 data/prepare.py --train .carry/data/sp2014_train.fasta.xz --valid .carry/data/sp2014_valid.fasta \
    --test .carry/data/sp2014_test.fasta --name sp2014 --out $PWD/data/sp2014 \
    --clusters .carry/data/sp2014_clusters.tsv.xz 2>&1 | tail -1
mkdir -p $OUT/r
PYTHONUNBUFFERED=1 timeout 250 python3 .carry/attn_sweep.py . .carry/data/sp2014_valid.fasta 2>&1 | grep -v Warning | tee $OUT/r/attn_sweep.txt
echo "sweep done at $(( $(date +%s) - t0 )) s"
(timeout 330 python3 -m pytest -v tests/test_gpu.py tests/test_triton_kernels.py > $OUT/r/pytest_gpu.txt 2>&1; echo "pytest rc $?" >> $OUT/r/pytest_gpu.txt) &
tests=$!
det() {  # LABEL
    PYTHONUNBUFFERED=1 timeout 150 python3 train.py --data data/sp2014 --preset sprint --tokens_per_rank 65536 \
        --max_steps 300 --val_every 300 --log_every 25 --seed 0 --sample_by_cluster --log_dir $OUT/r/det_$1 \
        --checkpoint_dir /tmp/ck_$1 > $OUT/r/det_$1.out 2>&1
    echo "== det $1: rc $? at $(( $(date +%s) - t0 )) s"
    grep -hE "^step:" $OUT/r/det_$1/*.txt | sed 's/ train_time.*//' > /tmp/det_$1.txt
    grep -h "val_loss" $OUT/r/det_$1/*.txt | tail -1 | cut -c1-120
}
det a; det b
if cmp -s /tmp/det_a.txt /tmp/det_b.txt; then echo "det a = b: the $(wc -l < /tmp/det_a.txt) step lines are identical"
else echo "det a != b:"; diff /tmp/det_a.txt /tmp/det_b.txt | head -6; fi
wait $tests
grep -E "PASS|FAIL|ERROR|passed|failed|skipped|rc " $OUT/r/pytest_gpu.txt | cut -c1-200 | tail -25
tar czf $OUT/r.tgz -C $OUT r && rm -r $OUT/r
echo "total $(( $(date +%s) - t0 )) s"
