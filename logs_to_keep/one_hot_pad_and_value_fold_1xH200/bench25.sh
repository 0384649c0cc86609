#!/usr/bin/env bash
# Issue 25: same-call A/B bench. For the tree as it is (base) and each variant in .carry/variants/NAME/ (the files
# it changes, at their repo paths, and a WHAT.txt), in turn: copy the tree to /tmp/v_NAME, lay the variant's files
# over it, bench it (--bench_steps 40), then train it 200 steps; finally a table in $OUT/bench25.txt, one
# $OUT/NAME.txt per run (its diff, bench report, top kernels, step lines, errors) and $OUT/logs.tgz (the run logs).
# Run from the repo root, with data/sp2014 built:   OUT=/some/folder bash bench25.sh
# The environment can change what it runs (the CPU check of this script uses the last four):
#   VARIANTS (in this order)  BUDGET (s for the whole script)  PRESET  TOKENS  DATA  BENCH_STEPS  TRAIN_STEPS
set -u
ROOT=$PWD
START=$(date +%s)
VARIANTS=${VARIANTS:-"pad40 vefold bwdtile bwdtile_hfirst"}
BUDGET=${BUDGET:-530}
PRESET=${PRESET:-sprint}
TOKENS=${TOKENS:-65536}
DATA=${DATA:-data/sp2014}
BENCH_STEPS=${BENCH_STEPS:-40}
TRAIN_STEPS=${TRAIN_STEPS:-200}
: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
[ -f "$DATA/manifest.json" ] || { echo "no shards in $DATA (no manifest.json): build them first" | tee "$OUT/bench25.txt"; exit 1; }

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
limit() { local l=$(( $(left) - 10 )); echo $(( l < $1 ? l : $1 )); }  # CAP: the cap, or what the budget leaves

make_tree() {  # NAME: /tmp/v_NAME = the tree (no logs, checkpoints, .git, .carry, shared, data shards) + the variant
    local name=$1 tree=/tmp/v_$1
    rm -rf "$tree" /tmp/bl_$name /tmp/tl_$name /tmp/ck_$name && mkdir -p "$tree"
    tar -C "$ROOT" --exclude=./logs --exclude=./checkpoints --exclude=./.git --exclude=./.carry --exclude=./shared \
        --exclude=./logs_to_keep --exclude="./$DATA" --exclude=__pycache__ -cf - . | tar -C "$tree" -xf -
    case $DATA in /*) ;; *) ln -s "$ROOT/$DATA" "$tree/$DATA" ;; esac  # the shards stay where they are
    : > /tmp/diff_$name
    if [ "$name" != base ] && [ "$name" != base2 ]; then
        local src=$ROOT/.carry/variants/$name f
        [ -d "$src" ] || { echo "no folder $src" > /tmp/diff_$name; return 1; }
        for f in $(cd "$src" && find . -type f ! -name WHAT.txt | sed 's|^\./||'); do
            mkdir -p "$tree/$(dirname "$f")" && cp "$src/$f" "$tree/$f"
            diff -u "$ROOT/$f" "$tree/$f" --label "a/$f" --label "b/$f" >> /tmp/diff_$name
        done
    fi
    return 0
}

run_one() {  # NAME [bench-only]: bench (and train) one tree, within the budget
    local name=$1 tree=/tmp/v_$1 t
    make_tree "$name" || { echo "== $name: no variant folder"; return; }
    t=$(limit 200)
    echo "== $name: bench (limit ${t}s, $(elapsed)s elapsed)"
    (cd "$tree" && PYTHONUNBUFFERED=1 timeout -k 10 "$t" python3 train.py --data "$DATA" --preset "$PRESET" \
        --tokens_per_rank "$TOKENS" --bench_steps "$BENCH_STEPS" --seed 0 --log_dir /tmp/bl_$name \
        --checkpoint_dir /tmp/ck_$name) > /tmp/out_bench_$name 2>&1
    echo "rc $?" >> /tmp/out_bench_$name
    grep -m1 "^bench:" /tmp/out_bench_$name
    [ "${2:-}" = bench-only ] && return
    t=$(limit 100)
    if [ "$t" -lt 20 ]; then echo "== $name: train skipped, $(left)s of the budget left"; return; fi
    echo "== $name: train $TRAIN_STEPS steps (limit ${t}s, $(elapsed)s elapsed)"
    (cd "$tree" && PYTHONUNBUFFERED=1 timeout -k 10 "$t" python3 train.py --data "$DATA" --preset "$PRESET" \
        --tokens_per_rank "$TOKENS" --max_steps "$TRAIN_STEPS" --val_every 0 --log_every $(( TRAIN_STEPS / 2 )) \
        --seed 0 --log_dir /tmp/tl_$name --checkpoint_dir /tmp/ck_$name) > /tmp/out_train_$name 2>&1
    echo "rc $?" >> /tmp/out_train_$name
    grep "^step:" /tmp/out_train_$name
    rm -rf /tmp/ck_$name
}

{ nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch; print('torch', torch.__version__)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>/dev/null; } > /tmp/env25
cat /tmp/env25
RAN="base"
run_one base
for v in $VARIANTS; do
    if [ "$(left)" -lt 95 ]; then echo "== $v: skipped, $(left)s of the budget left"; continue; fi
    run_one "$v"; RAN="$RAN $v"
done
if [ "$(left)" -gt 50 ]; then run_one base2 bench-only; RAN="$RAN base2"; fi  # the base again: the call's noise

python3 - "$OUT" "$BUDGET" "$TRAIN_STEPS" $RAN <<'EOF'
import glob, json, sys
out, budget, train_steps, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def records(folder):
    recs = []
    for path in glob.glob(f"{folder}/*.jsonl"):
        for line in open(path):
            try:
                recs.append(json.loads(line))
            except ValueError:  # a line cut short by a timeout
                pass
    return recs

def tail(path, n):
    try:
        return "".join(open(path, errors="replace").readlines()[-n:])
    except OSError:
        return "(none)\n"

runs = {}
for name in names:
    bench = next((r for r in records(f"/tmp/bl_{name}") if "ms_per_step" in r), None)
    steps = {r["step"]: r for r in records(f"/tmp/tl_{name}") if "train_loss" in r}
    final = next((r for r in records(f"/tmp/tl_{name}") if "valid_loss" in r), {})
    runs[name] = bench, steps, final
base_bench, base_steps, _ = runs["base"]
k100, k200 = train_steps // 2, train_steps  # the steps of the training runs' two loss lines

def kernel_ms(bench, pick):
    return sum(ms for name, _, ms, _ in bench["kernels"] if pick(name)) if bench and bench.get("kernels") else float("nan")

lines = [open("/tmp/env25").read().strip(), f"budget {budget} s; runs in this order: {' '.join(names)}", ""]
head = (f"{'run':16s} {'ms/step':>8s} {'vs base':>8s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>8s} {'compile':>7s} "
        f"{'bench loss last':>15s} {'loss@' + str(k100):>10s} {'loss@' + str(k200):>10s} {'val_loss':>8s}  train losses vs base")
lines += [head, "-" * len(head)]
for name, (bench, steps, final) in runs.items():
    if bench:
        vs = f"{100 * (bench['ms_per_step'] / base_bench['ms_per_step'] - 1):+.2f}%" if base_bench else "-"
        cols = (f"{bench['ms_per_step']:8.2f} {vs:>8s} {bench['tokens_per_sec']:10,.0f} {100 * bench['mfu']:5.1f}% "
                f"{bench.get('peak_memory_gib', float('nan')):8.2f} {bench['compile_s']:6.0f}s "
                f"{bench['train_losses'][-1]:15.4f}")
    else:
        cols = f"{'failed: see ' + name + '.txt':>74s}"
    loss = [steps[k]["train_loss"] if k in steps else float("nan") for k in (k100, k200)]
    same = []
    if name != "base" and steps and base_steps:
        d = max(abs(steps[k]["train_loss"] - base_steps[k]["train_loss"]) for k in base_steps if k in steps)
        same.append("identical" if d == 0 else f"max |diff| {d:.2e}")
    if bench and base_bench and name != "base":
        d = max(abs(a - b) for a, b in zip(bench["train_losses"], base_bench["train_losses"]))
        same.append("bench losses " + ("identical" if d == 0 else f"max |diff| {d:.2e}"))
    same = "; ".join(same)
    lines.append(f"{name:16s} {cols} {loss[0]:10.4f} {loss[1]:10.4f} {final.get('valid_loss', float('nan')):8.4f}  {same}")

lines += ["", "GPU ms per step of the 3 profiled steps, by kind, and some kernels:", ""]
kinds = ["matmul", "attention", "element-wise", "copy", "idle"]
head = (f"{'run':16s} " + " ".join(f"{k:>12s}" for k in kinds) + f" {'optimizer':>9s} {'profiled':>8s} "
        f"{'relu2 op':>8s} {'align1':>7s} {'badd':>6s}")
lines += [head, "-" * len(head)]
for name, (bench, _, _) in runs.items():
    if not bench or "gpu_ms_per_step" not in bench:
        lines.append(f"{name:16s} -")
        continue
    g = bench["gpu_ms_per_step"]
    lines.append(f"{name:16s} " + " ".join(f"{g.get(k, 0):12.3f}" for k in kinds)
                 + f" {bench['optimizer_ms_per_step']:9.3f} {bench['profiled_ms_per_step']:8.2f}"
                 + f" {kernel_ms(bench, lambda n: 'matmul_relu2' in n):8.3f} {kernel_ms(bench, lambda n: 'align1' in n):7.3f}"
                 + f" {kernel_ms(bench, lambda n: '_badd_' in n):6.3f}")
open(f"{out}/bench25.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

for name, (bench, steps, final) in runs.items():
    if name == "base2":  # a row of the table only: the files stay within the 8 that come back
        continue
    text = [f"# {name}", "", "## the variant's diff against the tree", tail(f"/tmp/diff_{name}", 400),
            "## bench output (tail)", tail(f"/tmp/out_bench_{name}", 40)]
    if bench and bench.get("kernels"):
        text += ["## top 45 kernels (ms and calls per step, profiled)"]
        who = bench.get("kernel_launchers", {})
        text += [f"{ms:8.3f} {calls:5.1f}x {cat:13s} {kname}\n{'':30s}<- {who.get(kname, '?')}"
                 for kname, cat, ms, calls in bench["kernels"][:45]]
        text += ["", "bench train losses: " + " ".join(f"{x:.4f}" for x in bench["train_losses"]), ""]
    text += ["## train output (tail)", tail(f"/tmp/out_train_{name}", 25)]
    open(f"{out}/{name}.txt", "w").write("\n".join(text) + "\n")
EOF
tar czf "$OUT/logs.tgz" -C /tmp $(cd /tmp && ls -d bl_* tl_* 2>/dev/null) 2>/dev/null
echo "total $(elapsed) s"
