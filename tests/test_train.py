"""The trainer as users run it: flags, a whole tiny run, resume, several processes, failure behaviour."""
import dataclasses
import functools
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import PRESETS
from train import Hyperparameters

REPO = Path(__file__).resolve().parent.parent


def tiny(data, tmp_path, **overrides) -> Hyperparameters:
    args = dict(data=str(data), preset="tiny", tokens_per_rank=2048, max_steps=8, val_every=4, log_every=1,
                num_workers=1, log_dir=str(tmp_path / "logs"), checkpoint_dir=str(tmp_path / "ckpt"), max_len=512,
                window_start=512)
    args.update(overrides)
    return Hyperparameters(**args)


def records(log_dir) -> list[dict]:
    (jsonl,) = Path(log_dir).glob("*.jsonl")
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def train_losses(log_dir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records(log_dir) if "train_loss" in r}


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


def test_bad_flags_are_rejected_before_any_work(small_shards):
    r = run_cli("--data", str(small_shards), "--tokens_per_rank", "1000", "--mask_rate", "1.5", "--preset", "huge",
                "--compile", "fast")
    assert r.returncode == 2
    assert "multiple of 128" in r.stderr and "--mask_rate" in r.stderr and "--preset must be one of" in r.stderr
    assert "--compile must be one of" in r.stderr
    assert run_cli("--data", str(small_shards), "--eval_only").returncode == 2


@pytest.mark.parametrize("ngpu, message", [
    ("3", "3 GPUs cannot share the record's 65536-token batch evenly; set NGPU to 1, 2, 4 or 8"),
    ("00", "no GPU found"), ("two", "NGPU must be a number of GPUs, got 'two'")])
def test_the_record_command_refuses_a_gpu_count_that_does_not_divide_its_batch(small_shards, ngpu, message):
    r = subprocess.run(["bash", str(REPO / "run.sh")], env={**os.environ, "NGPU": ngpu, "DATA": str(small_shards)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and message in r.stderr, r.stderr


def test_missing_data_names_the_command_that_makes_it(tmp_path):
    r = run_cli("--data", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert "python data/prepare.py" in r.stderr and "download_omgprot50.py" in r.stderr


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
    assert (Path(h.checkpoint_dir) / "step_000030.pt").exists()


def test_stops_as_soon_as_the_target_is_reached(small_shards, tmp_path):
    h = tiny(small_shards, tmp_path, max_steps=20, val_every=2, target_val_loss=10.0)
    train.main(h)
    (log,) = Path(h.log_dir).glob("*.txt")
    assert "target val_loss 10.0 reached at step 2 after" in log.read_text()


def test_resume_gives_the_same_losses_as_a_straight_run(small_shards, tmp_path):
    """A checkpoint between two log lines (step 3 of lines at 2, 4, ...) carries the loss summed since the last
    line, and the clock: the resumed run logs the same losses and goes on counting time from where it stopped."""
    straight = tiny(small_shards, tmp_path / "a", save_every=3, log_every=2)
    train.main(straight)
    ckpt = Path(straight.checkpoint_dir) / "step_000003.pt"
    resumed = tiny(small_shards, tmp_path / "b", log_every=2, resume=str(ckpt))
    train.main(resumed)
    a, b = train_losses(straight.log_dir), train_losses(resumed.log_dir)
    assert sorted(b) == [4, 6, 8]
    assert all(a[s] == b[s] for s in b), (a, b)
    saved_ms = torch.load(ckpt, weights_only=False)["train_ms"]
    first = next(r for r in records(resumed.log_dir) if r.get("step") == 4)
    assert 0 < saved_ms < first["train_time_ms"]


def test_two_processes_follow_the_trajectory_of_one_with_grad_accum(small_shards, tmp_path):
    one = tiny(small_shards, tmp_path / "one", grad_accum=2, max_steps=6, val_every=3)
    train.main(one)
    two = tiny(small_shards, tmp_path / "two", grad_accum=1, max_steps=6, val_every=3)
    r = torchrun(2, as_flags(two))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_losses(one.log_dir), train_losses(two.log_dir)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)
    # and the frozen validation of the same checkpoint is the same on 1 and 2 processes
    ckpt = str(Path(two.checkpoint_dir) / "step_000006.pt")
    e1 = train.main(tiny(small_shards, tmp_path / "e1", eval_only=True, resume=ckpt))
    e2 = torchrun(2, as_flags(tiny(small_shards, tmp_path / "e2", eval_only=True, resume=ckpt)))
    assert e2.returncode == 0, e2.stderr[-3000:]
    e2_record = next(r for r in records(tmp_path / "e2" / "logs") if "valid_loss" in r)
    for key in ("valid_loss", "test_loss", "valid_801010_loss", "valid_accuracy"):
        assert abs(e1[key] - e2_record[key]) < 1e-6, key


def test_a_diverged_run_stops_every_rank_and_keeps_its_good_checkpoints(small_shards, tmp_path):
    """Residual scalars blown up by a huge learning rate overflow the activations within a few steps: the run stops
    with a clear message on every rank (none hangs in a collective) and no checkpoint holds a non-finite weight."""
    h = tiny(small_shards, tmp_path, scalar_lr=1e30, max_steps=20, val_every=0, log_every=2, save_every=1)
    r = torchrun(2, as_flags(h))
    assert r.returncode != 0
    assert "non-finite training loss" in r.stderr + r.stdout and "lower learning rate" in r.stderr + r.stdout
    saved = sorted(Path(h.checkpoint_dir).glob("step_*.pt"))
    assert saved and all(torch_load_is_finite(p) for p in saved)


def torch_load_is_finite(path) -> bool:
    state = torch.load(path, weights_only=False)["model"]
    return all(torch.isfinite(t).all() for t in state.values())


def test_a_failed_hub_push_is_only_a_warning(small_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the upload fails at once
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    h = tiny(small_shards, tmp_path, max_steps=2, val_every=0, hf_repo="someone/plmrun-test")
    train.main(h)
    (log,) = Path(h.log_dir).glob("*.txt")
    assert "WARNING: could not push" in log.read_text()
    assert (Path(h.checkpoint_dir) / "step_000002.pt").exists()


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
    assert "bench: " in log.read_text() and not list(Path(h.checkpoint_dir).glob("*.pt"))  # it stops, trains nothing


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
    assert train.compiled(model, "blocks") is model
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
    ms, top, exposed, wall = train.kernel_time_breakdown(kernels, steps=2)
    assert ms == pytest.approx({"matmul": 0.05, "attention": 0.04, "element-wise": 0.035, "communication": 0.09,
                                "copy": 0.0, "idle": 0.01})
    assert exposed == pytest.approx(0.04)  # (200 - 150) + (330 - 300) µs over 2 steps
    assert wall == pytest.approx(0.165)
    assert top[0] == ("nvjet_sm90_tst_192x192", "matmul", pytest.approx(0.05))
    assert train.kernel_time_breakdown([], steps=3) == ({}, [], 0.0, 0.0)


def test_mean_keys_per_token_counts_documents_not_padding():
    from dataloader import Batch
    ids = torch.tensor([0, 5, 2, 0, 5, 5, 2, 1, 1], dtype=torch.int32)  # documents of 3 and 4 tokens, 2 <pad>
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2], dtype=torch.int32)
    b = Batch(ids, doc_ids, None, None)
    assert train.mean_keys_per_token([b], 1024) == pytest.approx((3 * 3 + 4 * 4) / 7)
    assert train.mean_keys_per_token([b, b], 2) == pytest.approx((3 * 2 + 4 * 2) / 7)  # capped by the window


def test_resuming_from_a_checkpoint_that_does_not_fit_is_refused_with_what_to_do(small_fasta, small_shards, tmp_path):
    h = tiny(small_shards, tmp_path / "a", max_steps=2, val_every=0)
    train.main(h)
    good = Path(h.checkpoint_dir) / "step_000002.pt"
    other = tmp_path / "other"  # the same sequences split with another seed: other shards
    subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--fasta", str(small_fasta), "--out", str(other),
                    "--name", "small", "--num_valid", "100", "--num_test", "100", "--seed", "1"], check=True,
                   capture_output=True)
    with pytest.raises(ValueError, match="trained on other data"):
        train.main(tiny(other, tmp_path / "b", resume=str(good)))
    with pytest.raises(ValueError, match="holds a 'tiny' model, not 'sprint'; pass --preset tiny"):
        train.main(tiny(small_shards, tmp_path / "c", preset="sprint", resume=str(good)))
    data = good.read_bytes()
    for name, damaged in [("half.pt", data[:len(data) // 2]), ("head.pt", data[:8192]), ("notes.pt", b"step 2\n")]:
        (tmp_path / name).write_bytes(damaged)  # copies cut short (torch.load fails differently) and a text file
        with pytest.raises(ValueError, match=rf"{name} is not a readable train.py checkpoint .* use an earlier one"):
            train.main(tiny(small_shards, tmp_path / "d", resume=str(tmp_path / name)))
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt is not a checkpoint written by train.py"):
        train.main(tiny(small_shards, tmp_path / "e", eval_only=True, resume=str(tmp_path / "foreign.pt")))
