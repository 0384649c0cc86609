# session 30 call 3: bench the tree (head) against CUDA graphs (v_graphs), per-direction MLP tiles (v_tiles) if time is left
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
    (cd /tmp/$2 && PYTHONUNBUFFERED=1 timeout 125 python3 train.py --data $OLDPWD/data/sp2014 --preset sprint \
        --tokens_per_rank 65536 --bench_steps 40 --log_dir $OUT/r/bench_$1 --checkpoint_dir /tmp/ck) > $OUT/r/bench_$1.out 2>&1
    echo "== $1 ($2): rc $? in $(( $(date +%s) - start )) s"
    grep -A12 "^bench:" $OUT/r/bench_$1.out | grep -v "communication" | head -12
    tail -3 $OUT/r/bench_$1.out | grep -i "error"
}
bench head head
bench graphs v_graphs
if [ $(( $(date +%s) - t0 )) -lt 130 ]; then bench tiles v_tiles; fi
tar czf $OUT/r.tgz -C $OUT r && rm -r $OUT/r
echo "total $(( $(date +%s) - t0 )) s"
