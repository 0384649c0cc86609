"""The trainer as users run it: flags, a whole tiny run, resume, several processes, failure behaviour."""
import dataclasses
import functools
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import PRESETS, compiled
from tools import bench
from train import Hyperparameters

REPO = Path(__file__).resolve().parent.parent


def tiny(data, tmp_path, **overrides) -> Hyperparameters:
    args = dict(data=str(data), preset="tiny", tokens_per_rank=1024, max_steps=8, val_every=4, log_every=1,
                num_workers=1, log_dir=str(tmp_path / "logs"), checkpoint_dir=str(tmp_path / "ckpt"), max_len=512,
                window_start=512)
    args.update(overrides)
    return Hyperparameters(**args)


def records(log_dir) -> list[dict]:
    (jsonl,) = Path(log_dir).glob("*.jsonl")
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def train_losses(log_dir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records(log_dir) if "train_loss" in r}


def saved(h: Hyperparameters, step: int) -> Path:
    """The checkpoint at `step` of the one run that wrote into h.checkpoint_dir (a folder per run)."""
    (run,) = Path(h.checkpoint_dir).iterdir()
    return run / f"step_{step:06d}.pt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def as_flags(h: Hyperparameters, **skip) -> list[str]:
    defaults = Hyperparameters()
    return [f"--{k}={v}" for k, v in vars(h).items() if v != getattr(defaults, k) and k not in skip]


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_bad_flags_are_rejected_before_any_work(small_shards, capsys):
    def refused(*argv) -> str:
        with pytest.raises(SystemExit) as exit:
            train.parse_args(["--data", str(small_shards), *argv])
        assert exit.value.code == 2
        return capsys.readouterr().err
    err = refused("--tokens_per_rank", "1000", "--mask_rate", "1.5")
    assert "multiple of 128" in err and "--mask_rate" in err  # every problem at once
    assert "argument --preset: invalid choice: 'huge' (choose from" in refused("--preset", "huge")
    assert "unrecognized arguments: --max_step 3" in refused("--max_step", "3")  # no silent prefix matching
    assert "--eval_only needs --resume" in refused("--eval_only")


def test_help_explains_every_flag_with_its_default():
    options = {" ".join(block.split()).split()[0]: " ".join(block.split())  # an entry per flag, starting "--name"
               for block in run_cli("--help").stdout.split("\noptions:\n")[1].split("\n  --")}
    for f in dataclasses.fields(Hyperparameters):
        entry = options[f.name]
        assert " ".join(f.metadata["help"].split())[:40] in entry and f"(default: {f.default})" in entry, f.name


@pytest.mark.parametrize("ngpu, message", [
    ("3", "3 GPUs cannot share the record's 65536-token batch evenly; set NGPU to 1, 2, 4 or 8"),
    ("two", "NGPU must be a number of GPUs, got 'two'")])
def test_the_record_command_refuses_a_gpu_count_that_does_not_divide_its_batch(small_shards, ngpu, message):
    r = subprocess.run(["bash", str(REPO / "run.sh")], env={**os.environ, "NGPU": ngpu, "DATA": str(small_shards)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_missing_data_names_the_command_that_makes_it(tmp_path):
    r = run_cli("--data", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "no shard folder there" in r.stderr and "python data/prepare.py --fasta" in r.stderr
    assert "python data/tracks.py" in r.stderr  # which lists each track's recipe


def test_a_tiny_run_writes_a_complete_log_and_learns(small_shards, tmp_path):
    h = tiny(small_shards, tmp_path, max_steps=30, val_every=15, log_every=5, muon_lr=0.02, embed_lr=0.05)
    final = train.main(h)
    (log,) = Path(h.log_dir).glob("*.txt")
    text = log.read_text()
    for name in train.SOURCE_FILES:  # the log alone is enough to rebuild the code
        assert f"==> {name} <==\n{(REPO / name).read_text()}" in text
    assert "hyperparameters: " in text and "git commit:" in text and "data sha256: " in text
    step_lines = [line for line in text.splitlines() if line.startswith("step:")]
    assert step_lines[-1].startswith("step:30/30 train_loss:") and " val_loss:" in step_lines[-1]
    assert all(" train_time:" in line and "ms step_avg:" in line and " tokens_per_sec:" in line for line in step_lines)
    assert text.rstrip().splitlines()[-1].startswith("no target set; trained 30 steps")
    recs = records(h.log_dir)
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert vals[-1] < vals[0] < 3.5  # learning, from about ln(25) at the start
    assert 0 < final["test_loss"] < 3.5 and 0 < final["valid_accuracy"] < 1
    assert saved(h, 30).exists()


def test_the_target_stops_a_run_only_when_asked(small_shards, tmp_path):
    """--stop_at_target, for experiments, ends the run at the first evaluation at the target (a record run trains
    every step: test_resume_continues_the_log_line_for_line checks its outcome)."""
    early = tiny(small_shards, tmp_path, max_steps=20, val_every=2, target_val_loss=10.0, stop_at_target=True)
    train.main(early)
    (log,) = Path(early.log_dir).glob("*.txt")
    assert "target val_loss 10.0 first reached at step 2 after" in log.read_text()
    assert records(early.log_dir)[-1]["final_step"] == 2


@pytest.mark.parametrize("save_every, log_every, val_every, at", [(2, 2, 2, 4), (3, 2, 4, 3)])
def test_resume_continues_the_log_line_for_line(small_shards, tmp_path, save_every, log_every, val_every, at):
    """A run killed after its checkpoint at step `at` has logged steps up to `at`; resumed from that checkpoint,
    it logs the rest: together, every train and validation loss of the straight run, none twice, and the clock
    goes on from where it stopped. First with a checkpoint at a log and evaluation step, then between log lines
    (the checkpoint then carries the loss summed since the last line)."""
    flags = dict(save_every=save_every, log_every=log_every, val_every=val_every, target_val_loss=3.0)
    straight = tiny(small_shards, tmp_path / "a", **flags)
    train.main(straight)
    resumed = tiny(small_shards, tmp_path / "b", resume=str(saved(straight, at)), **flags)
    train.main(resumed)
    logged = lambda rs: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rs if "step" in r]
    before_kill = [r for r in logged(records(straight.log_dir)) if r[0] <= at]
    assert before_kill + logged(records(resumed.log_dir)) == logged(records(straight.log_dir))
    finals = [next(r for r in records(h.log_dir) if "test_loss" in r) for h in (straight, resumed)]
    assert finals[0] == finals[1]
    outcomes = [records(h.log_dir)[-1] for h in (straight, resumed)]
    assert outcomes[0]["target_step"] == outcomes[1]["target_step"] and outcomes[0]["target_step"] is not None
    assert outcomes[0]["final_step"] == outcomes[1]["final_step"] == 8  # the target labels the log, stops nothing
    saved_ms = torch.load(saved(straight, at), weights_only=False)["train_ms"]
    first = next(r for r in records(resumed.log_dir) if "step" in r)
    assert 0 < saved_ms < first["train_time_ms"]


def test_two_processes_follow_the_trajectory_of_one_with_grad_accum(small_shards, tmp_path):
    one = tiny(small_shards, tmp_path / "one", grad_accum=2, max_steps=4, val_every=0)
    train.main(one)
    two = tiny(small_shards, tmp_path / "two", grad_accum=1, max_steps=4, val_every=0)
    r = torchrun(2, as_flags(two))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_losses(one.log_dir), train_losses(two.log_dir)
    assert sorted(a) == sorted(b) == list(range(1, 5))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    # and the frozen validation of the same checkpoint is the same on 1 and 2 processes: the two-process run's final
    # evaluations against one process evaluating its final checkpoint
    e1 = train.main(tiny(small_shards, tmp_path / "e1", eval_only=True, resume=str(saved(two, 4))))
    e2 = next(r for r in records(two.log_dir) if "test_loss" in r)
    for key in ("valid_loss", "test_loss", "valid_801010_loss", "valid_accuracy"):
        assert abs(e1[key] - e2[key]) < 1e-6, key


def test_a_diverged_run_stops_every_rank_and_keeps_its_good_checkpoints(small_shards, tmp_path):
    """Residual scalars blown up by a huge learning rate overflow the activations within a few steps: the run stops
    with a clear message on every rank (none hangs in a collective) and no checkpoint holds a non-finite weight."""
    h = tiny(small_shards, tmp_path, scalar_lr=1e30, max_steps=20, val_every=0, log_every=2, save_every=1)
    r = torchrun(2, as_flags(h))
    assert r.returncode != 0
    assert "non-finite training loss" in r.stderr + r.stdout and "lower learning rate" in r.stderr + r.stdout
    assert f'File "{REPO / "train.py"}"' not in r.stderr  # one message, no traceback of ours (torchrun adds its own)
    kept = sorted(Path(h.checkpoint_dir).glob("*/step_*.pt"))
    assert kept and all(torch_load_is_finite(p) for p in kept)
    (log,) = Path(h.log_dir).glob("*.txt")  # named as what it is: no tool takes it for a finished run
    assert log.name.endswith(".failed.txt")


def torch_load_is_finite(path) -> bool:
    state = torch.load(path, weights_only=False)["model"]
    return all(torch.isfinite(t).all() for t in state.values())


def test_a_failed_hub_push_is_only_a_warning(small_shards, tmp_path, monkeypatch):
    from huggingface_hub import constants  # read HF_ENDPOINT when first imported: set both
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the upload fails at once
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    h = tiny(small_shards, tmp_path, max_steps=2, val_every=0, hf_repo="someone/plmrun-test")
    train.main(h)
    (log,) = Path(h.log_dir).glob("*.txt")
    (warning,) = [line for line in log.read_text().splitlines() if line.startswith("WARNING: could not push")]
    assert warning.startswith(f"WARNING: could not push {saved(h, 2)}"), warning
    assert "Connection refused" in warning, warning  # the upload itself was tried, and failed where it should
    assert saved(h, 2).exists()


def test_wandb_logs_offline_without_an_api_key(small_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    h = tiny(small_shards, tmp_path, max_steps=2, val_every=0, wandb_project="plmrun-test")
    train.main(h)
    assert list((Path(h.log_dir) / "wandb").glob("offline-run-*"))


def test_bench_reports_throughput_and_mfu(small_shards, tmp_path):
    h = tiny(small_shards, tmp_path, bench_steps=2, max_steps=100)
    r = train.main(h)
    assert r["tokens_per_sec"] > 0 and r["ms_per_step"] > 0 and 0 < r["mfu"] < 1
    assert 1 < r["mean_keys_per_token"] <= h.max_len
    assert len(r["train_losses"]) == 2 and all(math.isfinite(x) for x in r["train_losses"])
    (log,) = Path(h.log_dir).glob("*.txt")
    assert "bench: " in log.read_text() and not list(Path(h.checkpoint_dir).glob("*/*.pt"))  # it stops, trains nothing


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("n_layer", [4, 8])
def test_compiling_blocks_makes_the_same_graphs_at_any_depth(monkeypatch, fresh_dynamo, n_layer):
    """--compile blocks: every block runs compiled code shared with the blocks of its kind (the first block, whose
    input is the embedding itself; blocks with value embeddings; the others), for training and for evaluation, so
    doubling the depth compiles nothing more, and the loss and gradients are the uncompiled model's. aot_eager
    stands in for inductor, whose CPU code generation would take minutes."""
    from torch._dynamo.utils import counters
    from test_model import make_batch, random_model
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    counters.clear()
    model = random_model(dataclasses.replace(PRESETS["tiny"], n_layer=n_layer))
    batch, w = make_batch([150, 200, 90, 60, 300]), torch.tensor(1024, dtype=torch.int32)
    ref = model(*batch, w)
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert compiled(model, "blocks") is model
    loss = model(*batch, w)
    loss.backward()
    assert counters["stats"]["unique_graphs"] == 3
    torch.testing.assert_close(loss, ref)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g)
    with torch.no_grad():  # evaluation compiles its own forward-only graphs, once
        for seed in range(2):
            model(*make_batch([150, 200, 90, 60, 300], seed=seed)[:3], None, w)
    assert counters["stats"]["unique_graphs"] == 6 <= torch._dynamo.config.recompile_limit


def test_the_kernel_breakdown_counts_communication_as_exposed_only_where_no_other_kernel_runs():
    """bench's profile summary, on a timeline of two steps (µs): per step, time by kind, idle gaps, and the
    communication that no compute kernel hides (overlapping collectives on two streams count once)."""
    kernels = [("nvjet_sm90_tst_192x192", 0, 100), ("triton_poi_fused_add_0", 100, 150),
               ("triton_poi_fused_mul_1", 20, 40),  # on another stream, inside the matmul
               ("ncclDevKernel_ReduceScatter_Sum_f32", 120, 200), ("triton_tem_fused_flex_attention_0", 220, 300),
               ("ncclDevKernel_AllGather_RING", 250, 330), ("ncclDevKernel_AllReduce_Sum_f32", 310, 330)]
    random.Random(0).shuffle(kernels)
    kernels.append(("triton_poi_fused_add_0", 200, 210))  # a second call of a kernel
    ms, ranked, exposed, wall = bench.kernel_time_breakdown(kernels, steps=2)
    assert ms == pytest.approx({"matmul": 0.05, "attention": 0.04, "element-wise": 0.04, "communication": 0.09,
                                "copy": 0.0, "idle": 0.005})
    assert exposed == pytest.approx(0.04)  # (200 - 150) + (330 - 300) µs over 2 steps
    assert wall == pytest.approx(0.165)
    assert len(ranked) == 7  # every kernel, each once, costliest first, with its calls per step
    assert ranked[0] == ("nvjet_sm90_tst_192x192", "matmul", pytest.approx(0.05), 0.5)
    assert ("triton_poi_fused_add_0", "element-wise", pytest.approx(0.03), 1.0) in ranked
    assert bench.kernel_time_breakdown([], steps=3) == ({}, [], 0.0, 0.0)


def test_the_bench_names_the_ops_that_launched_each_kernel():
    """Each kernel of the bench's table comes with the CPU ops that launched it: the outermost (where in the step)
    and the innermost three (which op), so a costly copy or element-wise pass can be traced to its line."""
    x = torch.randn(64, 64, device="cuda" if torch.cuda.is_available() else "cpu")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("step"), torch.profiler.record_function("update"):
            x.to(torch.bfloat16)
        torch.baddbmm(x[None], x[None], x[None], beta=0.5)  # on CUDA: a copy of its input, then the matmul
        torch.cuda.synchronize() if x.is_cuda else None
    chains = {bench.launcher(e) for e in prof.events() if e.name == "aten::copy_"}
    assert "step > ... > aten::to > aten::_to_copy > aten::copy_" in chains  # deeper than 4: first, ..., last 3
    launchers = bench.kernel_launchers(prof.events())
    if not x.is_cuda:
        assert launchers == {}  # no kernels on the CPU
    else:  # the copy runs inside baddbmm, through the dispatcher (aten::copy_) or not
        copies = [chain for name, chain in launchers.items() if name.startswith("Memcpy DtoD")]
        assert len(copies) == 1 and copies[0] in {"aten::baddbmm (1 of 1 profiled calls)",
                                                  "aten::baddbmm > aten::copy_ (1 of 1 profiled calls)"}, copies


def test_mean_keys_per_token_counts_documents_not_padding():
    from dataloader import Batch
    ids = torch.tensor([0, 5, 2, 0, 5, 5, 2, 1, 1], dtype=torch.int32)  # documents of 3 and 4 tokens, 2 <pad>
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2], dtype=torch.int32)
    b = Batch(ids, doc_ids, None, None)
    assert bench.mean_keys_per_token([b], 1024) == pytest.approx((3 * 3 + 4 * 4) / 7)
    assert bench.mean_keys_per_token([b, b], 2) == pytest.approx((3 * 2 + 4 * 2) / 7)  # capped by the window


def test_resuming_from_a_checkpoint_that_does_not_fit_is_refused_with_what_to_do(small_fasta, small_shards, tmp_path):
    h = tiny(small_shards, tmp_path / "a", max_steps=2, val_every=0)
    train.main(h)
    good = saved(h, 2)
    other = tmp_path / "other"  # the same sequences split with another seed: other shards
    subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--fasta", str(small_fasta), "--out", str(other),
                    "--name", "small", "--num_valid", "100", "--num_test", "100", "--seed", "1"], check=True,
                   capture_output=True)
    for data, change, message in [
            (other, {}, "trained on other data"),
            (small_shards, {"preset": "sprint"}, "holds a 'tiny' model, not 'sprint'; pass --preset tiny"),
            (small_shards, {"grad_accum": 2}, "--grad_accum 1, not 2; pass --grad_accum 1"),
            (small_shards, {"tokens_per_rank": 4096}, "pass --tokens_per_rank 1024"),
            (small_shards, {"normuon": True}, "--normuon False, not True; pass --normuon False")]:
        with pytest.raises(train.RunError, match=message):
            train.Trainer(tiny(data, tmp_path / "b", resume=str(good), **change))
    ckpt = train.load_checkpoint(good)
    assert train.resume_problems(ckpt, tiny(small_shards, tmp_path / "b", resume=str(good)), 2, ckpt["data_sha256"]) \
        == ["it was written by 1 rank(s), this run has 2; run it with torchrun --nproc_per_node=1 (or the same number "
            "of ranks over several nodes)"]
    data = good.read_bytes()
    for name, damaged in [("half.pt", data[:len(data) // 2]), ("head.pt", data[:8192]), ("notes.pt", b"step 2\n")]:
        (tmp_path / name).write_bytes(damaged)  # copies cut short (torch.load fails differently) and a text file
        with pytest.raises(train.RunError, match=rf"{name} is not a readable train.py checkpoint .* use an earlier one"):
            train.Trainer(tiny(small_shards, tmp_path / "d", resume=str(tmp_path / name)))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    r = run_cli(*as_flags(tiny(small_shards, tmp_path / "e", eval_only=True, resume=str(tmp_path / "foreign.pt"))))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"train.py: error: {tmp_path / 'foreign.pt'} is not a checkpoint written "
                                             "by train.py (no model weights, hyperparameters or data fingerprint)"]
    assert not list((tmp_path / "e").glob("logs/*"))  # refused before any log was opened


def test_shards_that_are_unlisted_missing_or_changed_are_refused_before_training(small_shards, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_shards, data)
    (shard,) = data.glob("*_valid_*.bin")
    command = json.loads((data / "manifest.json").read_text())["command"]
    stray = data / "small_train_000001.bin"
    stray.write_bytes((data / "small_train_000000.bin").read_bytes())
    cases = [("shard(s) small_train_000001.bin not listed in its manifest.json", lambda: None,
              lambda: stray.unlink()),
             (f"shard(s) {shard.name} changed since they were made", lambda: flip_last_byte(shard),
              lambda: flip_last_byte(shard)),
             (f"shard(s) {shard.name} listed in its manifest.json but missing", lambda: shard.rename(tmp_path / "x"),
              lambda: (tmp_path / "x").rename(shard))]
    for i, (message, damage, repair) in enumerate(cases):
        damage()
        if i == 0:  # through the command line once: one message, no traceback
            r = run_cli(*as_flags(tiny(data, tmp_path / "run", max_steps=1)))
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert message in r.stderr and f"remake the folder with: {command}" in r.stderr, r.stderr
        else:
            with pytest.raises(train.RunError, match=re.escape(f"{message}") + ".*" + re.escape(command)):
                train.Trainer(tiny(data, tmp_path / "run", max_steps=1))
        repair()
    assert train.Trainer(tiny(data, tmp_path / "run")).data_hash == train.Trainer(tiny(small_shards, tmp_path)).data_hash


def flip_last_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_the_training_loss_weighs_every_masked_token_the_same(small_shards, tmp_path):
    """grad_accum 2 over a full buffer and one with no masked token: the step's loss is the full buffer's mean
    (not half of it, as a mean of micro-batch means would give, and not NaN)."""
    from dataloader import Batch
    trainer = train.Trainer(tiny(small_shards, tmp_path, grad_accum=2, max_steps=1, muon_lr=0.0, embed_lr=0.0,
                                 head_lr=0.0, scalar_lr=0.0))
    trainer.start()
    full = next(trainer.loader)
    empty = Batch(full.input_ids, full.doc_ids, full.mask_idx, torch.full_like(full.targets, -100))
    loader, trainer.loader = trainer.loader, iter([full, empty])
    model = trainer.raw_model
    torch.manual_seed(0)
    for p in model.parameters():  # weights away from their zero init, so the head's gradient is informative
        p.data.normal_(0, 0.05)
    expected = model(*full[:3], None, trainer.windows[trainer.window_size(0)])
    expected = torch.nn.functional.cross_entropy(expected, full.targets, ignore_index=-100)
    loss = trainer.train_step(0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.loader = loader
    trainer.close(ok=True)


def test_a_cpu_run_too_big_for_memory_is_refused_with_what_to_do(small_shards, tmp_path):
    r = run_cli("--data", str(small_shards), "--preset", "tiny", "--log_dir", str(tmp_path / "logs"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "GiB on the CPU" in r.stderr and "pass --tokens_per_rank 4096, or train on a GPU" in r.stderr
    assert not (tmp_path / "logs").exists()
