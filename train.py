"""plmrun: pretrain a protein masked language model against the wall clock.

    torchrun --standalone --nproc_per_node=N train.py --grad_accum K [--flag value ...]
    python train.py [--flag value ...]            # one process, GPU if there is one, else CPU

Global batch = N x K x tokens_per_rank tokens. The clock counts training only: compilation and warm-up happen
before it starts, and it pauses while the frozen validation set is evaluated.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._functorch import config as functorch_config

from dataloader import PAD, TrainLoader, eval_batches
from model import PRESETS, Model, triton_qk_norm
from optimizer import build_optimizer

REPO = Path(__file__).resolve().parent
SOURCE_FILES = ["train.py", "model.py", "triton_kernels.py", "optimizer.py", "dataloader.py"]
PEAK_FLOPS = 989e12  # dense bf16 FLOP/s of one H100 SXM: the denominator of MFU
SCHEMES = ("mask", "80/10/10")  # masking schemes: of --mask_scheme, and of the frozen sets
COMPILE_MODES = ("model", "blocks", "none")


@dataclass
class Hyperparameters:
    # data: a folder made by data/prepare.py or data/download_omgprot50.py
    data: str = "data/sp2014"
    tokens_per_rank: int = 65536        # tokens in one micro-batch on one GPU (a multiple of 128)
    grad_accum: int = 1                 # micro-batches per rank per optimizer step
    max_len: int = 1024                 # longer training documents are cropped at a random offset
    mask_rate: float = 0.15
    mask_scheme: str = "mask"           # "mask" (every selected residue -> <mask>) or "80/10/10"
    num_workers: int = 4                # loader processes per rank
    # model
    preset: str = "speedrun"
    compile: str = "model"              # CUDA only. "model": one graph (fastest steps); "blocks": one graph per kind
                                        # of transformer block, shared by all (compiles in a fraction of the time,
                                        # the rest runs eagerly); "none": eager, for debugging on small batches
                                        # (uncompiled FlexAttention materialises the T x T scores)
    activation_memory: float = 1.0      # share of the activations the compiled backward keeps (< 1: recompute the
                                        # cheapest others, for a smaller GPU or a bigger micro-batch)
    # run length and stopping
    max_steps: int = 1000
    max_tokens: int = 0                 # if > 0, also stop after this many training tokens
    target_val_loss: float = 0.0        # if > 0, stop as soon as the frozen validation loss reaches it
    val_every: int = 100                # steps between evaluations (0: only at the end)
    log_every: int = 10                 # steps between train-loss log lines (each one syncs the host)
    seed: int = 0
    # optimization: learning rates and the schedule multiplying them
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85   # Muon momentum warms up from this value...
    muon_momentum_warmup_steps: int = 300  # ...to muon_momentum over these steps
    muon_weight_decay: float = 0.0
    embed_lr: float = 0.3
    head_lr: float = 0.008
    scalar_lr: float = 0.04
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    warmup_frac: float = 0.02           # linear learning-rate warm-up, fraction of the run
    cooldown_frac: float = 0.45         # linear decay to zero over the last fraction of the run
    window_start: int = 1024            # sliding-window size at step 0, grown linearly to max_len by the end
    # bookkeeping
    log_dir: str = "logs"
    save_every: int = 0                 # steps between checkpoints (0: none but the final one)
    checkpoint_dir: str = "checkpoints"
    keep_checkpoints: int = 3
    resume: str = ""                    # checkpoint to continue from (or to evaluate, with --eval_only)
    eval_only: bool = False
    wandb_project: str = ""
    hf_repo: str = ""                   # push the final checkpoint to this Hugging Face model repo
    bench_steps: int = 0                # > 0: after warm-up, time this many steps, profile 3 more, report, stop


def parse_args(argv=None) -> Hyperparameters:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Hyperparameters):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", type=parse_bool, nargs="?", const=True, default=f.default)
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=f.default)
    args = Hyperparameters(**vars(parser.parse_args(argv)))
    problems = check_args(args)
    if problems:
        parser.error("\n  " + "\n  ".join(problems))
    return args


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def check_args(a: Hyperparameters) -> list[str]:
    """Every flag is checked before any work starts, so a typo never costs a compile."""
    p = []
    for name in ("tokens_per_rank", "grad_accum", "max_len", "max_steps", "log_every", "keep_checkpoints",
                 "window_start"):
        if getattr(a, name) <= 0:
            p.append(f"--{name} must be positive, got {getattr(a, name)}")
    for name in ("max_tokens", "val_every", "save_every", "num_workers", "muon_momentum_warmup_steps", "bench_steps"):
        if getattr(a, name) < 0:
            p.append(f"--{name} must be >= 0, got {getattr(a, name)}")
    if a.tokens_per_rank % 128:
        p.append(f"--tokens_per_rank must be a multiple of 128 (the attention block size), got {a.tokens_per_rank}")
    if a.tokens_per_rank < a.max_len:
        p.append(f"--tokens_per_rank ({a.tokens_per_rank}) must hold at least one document of --max_len ({a.max_len})")
    if a.compile not in COMPILE_MODES:
        p.append(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {a.compile!r}")
    if not 0 <= a.activation_memory <= 1:
        p.append(f"--activation_memory must be in [0, 1], got {a.activation_memory}")
    if not 0 < a.mask_rate < 1:
        p.append(f"--mask_rate must be in (0, 1), got {a.mask_rate}")
    if a.mask_scheme not in SCHEMES:
        p.append(f"--mask_scheme must be 'mask' or '80/10/10', got {a.mask_scheme!r}")
    if a.preset not in PRESETS:
        p.append(f"--preset must be one of {', '.join(PRESETS)}, got {a.preset!r}")
    if not (0 <= a.warmup_frac <= 1 and 0 <= a.cooldown_frac <= 1 and a.warmup_frac + a.cooldown_frac <= 1):
        p.append("--warmup_frac and --cooldown_frac must lie in [0, 1] and add up to at most 1")
    if a.target_val_loss < 0:
        p.append(f"--target_val_loss must be >= 0, got {a.target_val_loss}")
    if a.eval_only and not a.resume:
        p.append("--eval_only needs --resume PATH (the checkpoint to evaluate)")
    if a.resume and not Path(a.resume).is_file():
        p.append(f"--resume {a.resume}: no such checkpoint file")
    data = Path(a.data)
    for split in ("train", "valid", "test"):
        if not sorted(data.glob(f"*_{split}_*.bin")):
            p.append(f"--data {data}: no *_{split}_*.bin shards. Make them with e.g.\n"
                     "    python data/prepare.py --train ../shared/data/sp2014_train.fasta.xz "
                     "--valid ../shared/data/sp2014_valid.fasta --test ../shared/data/sp2014_test.fasta "
                     f"--name sp2014 --out {data}\n  or download OMGprot50: python data/download_omgprot50.py --out {data}")
            break
    return p


# ----------------------------------------------------------------------------------------------------------------
# schedules: functions of the step alone, so a resumed run continues them exactly

def lr_multiplier(step: int, total: int, a: Hyperparameters) -> float:
    warmup, cooldown = round(a.warmup_frac * total), round(a.cooldown_frac * total)
    if step < warmup:
        return (step + 1) / warmup
    if step < total - cooldown:
        return 1.0
    return (total - step) / max(cooldown, 1)


def muon_momentum(step: int, a: Hyperparameters) -> float:
    frac = min(step / a.muon_momentum_warmup_steps, 1.0) if a.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * a.muon_momentum_start + frac * a.muon_momentum


def window_size(step: int, total: int, a: Hyperparameters) -> int:
    """Sliding-window size in tokens, grown linearly to max_len in multiples of the 128-token attention block."""
    size = a.window_start + (a.max_len - a.window_start) * step / max(total - 1, 1)
    return min(128 * math.ceil(size / 128), a.max_len) if a.window_start < a.max_len else a.max_len


# ----------------------------------------------------------------------------------------------------------------
# logging: a text log that holds everything needed to reproduce the run, and a JSONL twin for tools

class RunLog:
    def __init__(self, a: Hyperparameters, master: bool, run_id: str):
        self.master = master
        self.wandb = None
        if not master:
            return
        Path(a.log_dir).mkdir(parents=True, exist_ok=True)
        self.txt_path = Path(a.log_dir) / f"{run_id}.txt"
        self.txt = open(self.txt_path, "w")
        self.jsonl = open(Path(a.log_dir) / f"{run_id}.jsonl", "w")
        if a.wandb_project:
            import wandb  # only when asked for: training never needs it
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=a.wandb_project, name=run_id, config=dataclasses.asdict(a), mode=mode,
                                    dir=a.log_dir)

    def header(self, text: str, **record):
        """A line of the log's head, not printed; a record, if any, goes to the JSONL as well."""
        if self.master:
            self.txt.write(text + "\n")
            self.txt.flush()
            if record:  # flushed: a run killed while compiling still tells tools what it was
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()

    def line(self, text: str, **record):
        if not self.master:
            return
        print(text, flush=True)
        self.txt.write(text + "\n")
        self.txt.flush()
        if record:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self):
        if self.master:
            self.txt.close()
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()


def environment() -> str:
    def run(cmd):
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = run(["git", "rev-parse", "HEAD"]) or "unknown (not a git checkout)"
    dirty = bool(run(["git", "status", "--porcelain", "--untracked-files=no"]))
    gpus = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    return "\n".join([
        f"python: {platform.python_version()}  torch: {torch.__version__}  cuda: {torch.version.cuda}",
        f"host: {platform.node()}  platform: {platform.platform()}",
        f"gpus ({len(gpus.splitlines()) if gpus else 0}): " + ("; ".join(gpus.splitlines()) or "none"),
        f"git commit: {commit}  dirty: {dirty}",
    ])


def data_sha256(data_dir: str) -> str:
    """A fingerprint of the shards (names and sha256s listed in manifest.json), not of the paths they were made
    from: the same data prepared anywhere gives the same value."""
    path = Path(data_dir) / "manifest.json"
    if not path.exists():
        return "none (no manifest.json)"
    splits = json.loads(path.read_text())["splits"]
    shards = [(s["file"], s["sha256"]) for split in ("train", "valid", "test") for s in splits[split]["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: written atomically (temporary name, then rename), the last few kept

def save_checkpoint(path: Path, state: dict, keep: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
        old.unlink()


def load_checkpoint(path) -> dict:
    """A checkpoint written by train.py, read onto the CPU; anything else is refused with a message naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load fails in many ways (zip, pickle, I/O) on a damaged file
        first_line = (str(e).strip().splitlines() or [""])[0][:150]
        raise ValueError(f"{path} is not a readable train.py checkpoint ({type(e).__name__}: {first_line}). A copy cut "
                         "short? train.py keeps the last --keep_checkpoints of a run in its --checkpoint_dir: use an "
                         "earlier one") from e
    if not (isinstance(ckpt, dict) and {"model", "data_sha256"} <= ckpt.keys()
            and isinstance(ckpt.get("hyperparameters"), dict) and "preset" in ckpt["hyperparameters"]):
        raise ValueError(f"{path} is not a checkpoint written by train.py (no model weights, hyperparameters or "
                         "data fingerprint)")
    return ckpt


def rng_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    torch.set_rng_state(states["cpu"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


# ----------------------------------------------------------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, batches: list, window: torch.Tensor) -> dict:
    """Frozen-set metrics: cross-entropy summed over every masked token of the set / their count, over all ranks."""
    totals = torch.zeros(3, dtype=torch.float64, device=window.device)
    for b in batches:
        logits = model(b.input_ids, b.doc_ids, b.mask_idx, None, window)
        labelled = b.targets != -100
        loss_sum = F.cross_entropy(logits, b.targets, ignore_index=-100, reduction="sum")
        correct = ((logits.argmax(-1) == b.targets) & labelled).sum()
        totals += torch.stack([loss_sum.double(), correct.double(), labelled.sum().double()])
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return {"loss": loss_sum / count, "accuracy": correct / count, "tokens": int(count)}


def metric_key(split: str, scheme: str) -> str:
    """The prefix a frozen set's metrics are logged under: valid, valid_801010, test, test_801010."""
    return split if scheme == "mask" else f"{split}_801010"


def main(a: Hyperparameters):
    # ---- processes and devices
    distributed = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    master = rank == 0
    run_id = [str(uuid.uuid4()) if master else None]
    if distributed:
        dist.broadcast_object_list(run_id)
    # a checkpoint that does not fit is refused before anything is logged or built
    data_hash = data_sha256(a.data)
    ckpt = load_checkpoint(a.resume) if a.resume else None  # moved to the device where loaded
    if ckpt and ckpt["hyperparameters"]["preset"] != a.preset:
        raise ValueError(f"--resume {a.resume} holds a {ckpt['hyperparameters']['preset']!r} model, not {a.preset!r}; "
                         f"pass --preset {ckpt['hyperparameters']['preset']}")
    if ckpt and not a.eval_only and ckpt["data_sha256"] != data_hash:
        raise ValueError(f"--resume {a.resume} was trained on other data (sha256 {ckpt['data_sha256']}) than "
                         f"--data {a.data} ({data_hash}); resume with the data it was trained on")
    log = RunLog(a, master, run_id[0])
    global_batch = world * a.grad_accum * a.tokens_per_rank
    total_steps = a.max_steps if not a.max_tokens else min(a.max_steps, math.ceil(a.max_tokens / global_batch))

    log.header("=" * 100)
    for name in SOURCE_FILES:
        log.header(f"==> {name} <==\n{(REPO / name).read_text()}")
    log.header("=" * 100)
    log.header("command: " + " ".join([sys.executable] + sys.argv) + f"  (world size {world})")
    log.header("hyperparameters: " + json.dumps(dataclasses.asdict(a)))
    log.header(environment())
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    log.header(f"date: {date}\ndata sha256: {data_hash}", kind="run", date=date, world_size=world,
               hyperparameters=dataclasses.asdict(a), data_sha256=data_hash)

    # ---- model, optimizer, data
    torch.manual_seed(a.seed)
    raw_model = Model(dataclasses.replace(PRESETS[a.preset], max_len=a.max_len)).to(device)
    functorch_config.activation_memory_budget = a.activation_memory  # read when the backward is compiled
    model = compiled(raw_model, a.compile if device.type == "cuda" else "none")
    optimizer_args = dict(muon_lr=a.muon_lr, muon_momentum=a.muon_momentum, muon_weight_decay=a.muon_weight_decay,
                          embed_lr=a.embed_lr, head_lr=a.head_lr, scalar_lr=a.scalar_lr,
                          betas=(a.adam_beta1, a.adam_beta2))
    optimizer = build_optimizer(raw_model, **optimizer_args)
    shards = {s: sorted(Path(a.data).glob(f"*_{s}_*.bin")) for s in ("train", "valid", "test")}
    eval_sets = {(split, scheme): [b.to(device) for b in eval_batches(shards[split], a.tokens_per_rank, scheme=scheme,
                                                                      max_len=a.max_len)[rank::world]]
                 for split in ("valid", "test") for scheme in SCHEMES}
    full_window = torch.tensor(a.max_len, dtype=torch.int32, device=device)
    log.line(f"model: {a.preset} {raw_model.num_params():,} parameters | global batch {global_batch:,} tokens "
             f"= {world} ranks x {a.grad_accum} micro-batches x {a.tokens_per_rank:,} | {total_steps} steps | "
             f"device {device} | QK-norm + rotary: {'Triton op' if triton_qk_norm(device) else 'formula'}")

    def run_evals(splits, schemes=SCHEMES):
        results = {}
        for split in splits:
            for scheme in schemes:
                r = evaluate(model, eval_sets[split, scheme], full_window)
                key = metric_key(split, scheme)
                results[f"{key}_loss"], results[f"{key}_accuracy"] = r["loss"], r["accuracy"]
        return results

    if a.eval_only:
        raw_model.load_state_dict(ckpt["model"])
        results = run_evals(["valid", "test"])
        log.line(" ".join(f"{k}:{v:.4f}" for k, v in results.items()), **results)
        log.close()
        return results

    loader = TrainLoader(shards["train"], a.tokens_per_rank, rank=rank, world_size=world, seed=a.seed,
                         max_len=a.max_len, mask_rate=a.mask_rate, mask_scheme=a.mask_scheme,
                         num_workers=a.num_workers, pin_memory=device.type == "cuda")

    # every window size the run uses, on the device up front: a per-step copy from pageable host memory would sync
    windows = {w: torch.tensor(w, dtype=torch.int32, device=device)
               for w in {window_size(s, total_steps, a) for s in range(total_steps + 1)}}

    def train_step(step: int) -> torch.Tensor:
        """One optimizer step; returns the mean micro-batch loss as a device tensor (no host sync)."""
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(step, total_steps, a)
            if "momentum" in group:
                group["momentum"] = muon_momentum(step, a)
        window = windows[window_size(step, total_steps, a)]
        loss_sum = torch.zeros((), device=device)
        for _ in range(a.grad_accum):
            b = next(loader).to(device)
            loss = model(b.input_ids, b.doc_ids, b.mask_idx, b.targets, window)
            (loss / a.grad_accum).backward()
            loss_sum += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / a.grad_accum

    # ---- warm-up: compile every shape the run uses on throwaway steps, then restore the initial state
    t = time.perf_counter()
    initial = {"model": copy.deepcopy(raw_model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
               "loader": loader.state_dict(), "rng": rng_states()}
    for step in range(2):
        train_step(step)
    evaluate(model, eval_sets["valid", "mask"][:1], full_window)  # every eval batch has this one's shapes
    raw_model.load_state_dict(initial["model"])
    optimizer.load_state_dict(initial["optimizer"])
    loader.load_state_dict(initial["loader"])
    set_rng_states(initial["rng"])
    # the clock, and the training loss summed over all ranks since the last log line: kept in checkpoints
    start_step, train_ms, pending_loss, loss_steps = 0, 0.0, 0.0, 0
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"][rank])
        set_rng_states(ckpt["rng"])
        start_step, train_ms, loss_steps = ckpt["step"], ckpt["train_ms"], ckpt["loss_steps"]
        pending_loss = ckpt["pending_loss"] if master else 0.0  # all-reduced at the next log line
        log.line(f"resumed from {a.resume} at step {start_step} after {train_ms / 1000:.2f}s of training")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    compile_s = time.perf_counter() - t
    log.line(f"compile and warm-up: {compile_s:.1f}s")
    if a.bench_steps:
        result = benchmark(a, train_step, raw_model, optimizer, loader, world, compile_s, log)
        log.close()
        loader.close()
        return result

    def checkpoint(step: int):
        pending = all_reduce_sum(loss_acc.clone()).item()
        finite = torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()])
        if not (finite.all().item() and math.isfinite(pending)):  # a diverged state never replaces a good checkpoint
            raise FloatingPointError(f"non-finite training loss or weights at step {step}; the last good "
                                     f"checkpoint stays in {a.checkpoint_dir}. Try a lower learning rate.")
        loader_states = [None] * world
        if distributed:
            dist.all_gather_object(loader_states, loader.state_dict())
        else:
            loader_states = [loader.state_dict()]
        optimizer_state = optimizer.state_dict()  # a collective: every rank gathers the Muon momenta
        if master:
            save_checkpoint(Path(a.checkpoint_dir) / f"step_{step:06d}.pt",
                            {"model": raw_model.state_dict(), "optimizer": optimizer_state,
                             "loader": loader_states, "rng": rng_states(), "step": step, "train_ms": train_ms,
                             "pending_loss": pending, "loss_steps": loss_steps, "data_sha256": data_hash,
                             "hyperparameters": dataclasses.asdict(a), "run_id": run_id[0]},
                            a.keep_checkpoints)

    # ---- training: the clock runs only here
    reached = None
    loss_acc = torch.tensor(pending_loss, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step = start_step
    while True:
        last = step == total_steps
        evaluate_now = last or (a.val_every and step % a.val_every == 0 and step > start_step)
        log_now = evaluate_now or (step > start_step and step % a.log_every == 0)
        if log_now:
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            record = {"step": step, "train_time_ms": train_ms, "tokens": step * global_batch}
            text = f"step:{step}/{total_steps}"
            if loss_steps:
                train_loss = all_reduce_sum(loss_acc.clone()).item() / (world * loss_steps)
                if not math.isfinite(train_loss):
                    log.line(f"stopping: the training loss is {train_loss} at step {step}. The last checkpoint "
                             f"in {a.checkpoint_dir} (if any) holds the last good state; try a lower learning rate.")
                    raise FloatingPointError(f"non-finite training loss {train_loss} at step {step}")
                record["train_loss"] = train_loss
                text += f" train_loss:{train_loss:.4f}"
                loss_acc.zero_()
                loss_steps = 0
            if evaluate_now:
                results = run_evals(["valid"], ["mask"])  # the 80/10/10 loss only at the end: half the pause
                record.update(val_loss=results["valid_loss"], val_accuracy=results["valid_accuracy"])
                text += f" val_loss:{results['valid_loss']:.4f}"
                if a.target_val_loss and results["valid_loss"] <= a.target_val_loss:
                    reached = (step, train_ms)
            tokens_per_sec = step * global_batch / (train_ms / 1000) if train_ms else 0.0
            record.update(step_avg_ms=train_ms / max(step, 1), tokens_per_sec=tokens_per_sec)
            text += (f" train_time:{train_ms:.0f}ms step_avg:{record['step_avg_ms']:.2f}ms"
                     f" tokens_per_sec:{tokens_per_sec:.0f}")
            log.line(text, **record)
            sync()
            t0 = time.perf_counter()
        if last or reached:
            break
        loss_acc += train_step(step)
        loss_steps += 1
        step += 1
        if a.save_every and step % a.save_every == 0:  # off the clock, like evaluation
            sync()
            train_ms += 1000 * (time.perf_counter() - t0)
            checkpoint(step)
            t0 = time.perf_counter()

    # ---- the end: final test evaluation, summary, final checkpoint
    final = run_evals(["valid", "test"])
    if device.type == "cuda":
        log.line(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                 f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
    log.line(" ".join(f"{k}:{v:.4f}" for k, v in final.items()), **final)
    if a.target_val_loss:
        outcome = (f"target val_loss {a.target_val_loss} reached at step {reached[0]} after {reached[1] / 1000:.2f}s "
                   f"of training ({reached[0] * global_batch:,} tokens)" if reached else
                   f"target val_loss {a.target_val_loss} NOT reached in {step} steps ({train_ms / 1000:.2f}s)")
    else:
        outcome = f"no target set; trained {step} steps in {train_ms / 1000:.2f}s"
    log.line(outcome, target_reached=bool(reached), final_step=step, train_time_ms=train_ms)
    checkpoint(step)
    if master and a.hf_repo:
        push_to_hub(Path(a.checkpoint_dir) / f"step_{step:06d}.pt", a.hf_repo, log)
    log.close()
    loader.close()
    return final


# ----------------------------------------------------------------------------------------------------------------
# --bench_steps: steady-state throughput, MFU and where the GPU time goes

def benchmark(a: Hyperparameters, train_step, raw_model, optimizer, loader, world: int, compile_s: float,
              log: RunLog) -> dict:
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    keys = mean_keys_per_token([next(loader) for _ in range(8)], window_size(0, a.max_steps, a))
    tokens = world * a.grad_accum * a.tokens_per_rank
    for step in range(3):  # untimed: the loader's queues and the allocator settle
        train_step(step)
    sync()
    t = time.perf_counter()
    losses = [train_step(step) for step in range(a.bench_steps)]  # device tensors: no host sync while timed
    sync()
    step_s = (time.perf_counter() - t) / a.bench_steps
    flops = raw_model.flops_per_token(keys) * tokens / step_s
    r = {"preset": a.preset, "world_size": world, "tokens_per_rank": a.tokens_per_rank, "grad_accum": a.grad_accum,
         "tokens_per_sec": tokens / step_s, "ms_per_step": 1000 * step_s, "mfu": flops / (PEAK_FLOPS * world),
         "model_tflops_per_gpu": flops / world / 1e12, "mean_keys_per_token": keys, "compile_s": compile_s,
         "train_losses": (all_reduce_sum(torch.stack(losses)) / world).tolist()}  # the mean over ranks, as logged
    text = (f"bench: {r['tokens_per_sec']:,.0f} tokens/s | {r['ms_per_step']:.1f} ms/step | MFU {100 * r['mfu']:.1f}% "
            f"({r['model_tflops_per_gpu']:.0f} TFLOP/s per GPU, {keys:.0f} keys per token) | compile {compile_s:.0f}s"
            f" | train loss {r['train_losses'][0]:.3f} -> {r['train_losses'][-1]:.3f} over the timed steps")
    if cuda:
        r["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        spans = []  # CUDA events around each optimizer step: its span on the GPU timeline

        untimed_step = optimizer.step

        def timed_optimizer_step():
            spans.append([torch.cuda.Event(enable_timing=True) for _ in range(2)])
            spans[-1][0].record()
            untimed_step()
            spans[-1][1].record()

        optimizer.step = timed_optimizer_step  # for the profiled steps only
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for step in range(3):
                train_step(step)
            sync()
        del optimizer.step
        (r["gpu_ms_per_step"], r["top_kernels"], r["exposed_communication_ms"],
         r["profiled_ms_per_step"]) = gpu_time_breakdown(prof, steps=3)
        r["optimizer_ms_per_step"] = sum(start.elapsed_time(end) for start, end in spans) / len(spans)
        gpu_total = r["profiled_ms_per_step"] or float("nan")  # nan: the profiler saw no kernel
        text += (f" | peak memory {r['peak_memory_gib']:.1f} GiB\nGPU time per step (profiled, {gpu_total:.1f} ms "
                 "from the first kernel to the last):\n") + "\n".join(
            f"  {k:14s}{v:9.1f} ms {100 * v / gpu_total:5.1f}%" for k, v in r["gpu_ms_per_step"].items())
        text += (f"\n  of which the optimizer step spans {r['optimizer_ms_per_step']:.1f} ms "
                 f"({100 * r['optimizer_ms_per_step'] / gpu_total:.1f}%; its kernels are counted above by kind)")
        text += (f"\n  communication no other kernel hid (waits for slower ranks included): "
                 f"{r['exposed_communication_ms']:.1f} ms ({100 * r['exposed_communication_ms'] / gpu_total:.1f}%)")
        text += "\ntop kernels (ms per step):\n" + "\n".join(f"  {ms:8.1f}  {cat:13s} {name}"
                                                          for name, cat, ms in r["top_kernels"])
    log.line(text, **r)
    return r


def compiled(model: Model, mode: str) -> Model:
    """The model to call: compiled whole, or with each block compiled. Blocks share their compiled code (the
    parameters are graph inputs), so the compile time of "blocks" does not grow with depth; the graphs stop at block
    boundaries, which costs the fusions across them."""
    if mode == "model":
        return torch.compile(model, dynamic=False, fullgraph=True)
    if mode == "blocks":
        # the blocks share one code cache: 3 kinds (the first, with value embeddings, without) x (train, eval) = 6
        # graphs, within dynamo's recompile_limit of 8; with fullgraph, one more would stop the run, not slow it
        for block in model.blocks:
            block.compile(dynamic=False, fullgraph=True)
    return model


def mean_keys_per_token(batches: list, window: int) -> float:
    """sum(L * min(L, window)) / sum(L) over the batches' documents (the <pad> tail left out): the keys a token
    attends to on average, the attention term of Model.flops_per_token."""
    lengths = torch.cat([torch.bincount(b.doc_ids[b.input_ids != PAD].long()) for b in batches]).double()
    lengths = lengths[lengths > 0]
    return float((lengths * lengths.clamp(max=window)).sum() / lengths.sum())


def kernel_category(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "communication"
    if "flex" in n or "triton_tem" in n:  # FlexAttention's kernels are inductor templates
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "gemv")):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "element-wise"


def gpu_time_breakdown(prof, steps: int) -> tuple[dict, list, float, float]:
    """kernel_time_breakdown of the CUDA kernels a torch.profiler run recorded."""
    return kernel_time_breakdown([(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                                  # user annotations also show on the GPU timeline, as spans
                                  if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation],
                                 steps)


def kernel_time_breakdown(kernels: list[tuple[str, float, float]], steps: int) -> tuple[dict, list, float, float]:
    """From (name, start µs, end µs) of every kernel over `steps` steps, per step in ms: the time by kind of kernel
    (idle: the gaps between the first and the last kernel that no kernel covers), the costliest kernels, the exposed
    communication (communication kernels running while no other kernel does) and the wall time from the first kernel
    to the last. Kernels on several streams overlap, so the kinds can add up to more than the wall time."""
    if not kernels:
        return {}, [], 0.0, 0.0
    ms = dict.fromkeys(["matmul", "attention", "element-wise", "communication", "copy", "idle"], 0.0)
    by_name, compute = {}, []
    for name, start, end in kernels:
        category = kernel_category(name)
        ms[category] += (end - start) / 1000 / steps
        by_name[name, category] = by_name.get((name, category), 0.0) + (end - start) / 1000 / steps
        if category != "communication":
            compute.append((start, end))
    busy = union_length([(start, end) for _, start, end in kernels])
    wall = max(end for *_, end in kernels) - min(start for _, start, _ in kernels)
    ms["idle"] = (wall - busy) / 1000 / steps
    exposed = (busy - union_length(compute)) / 1000 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return ms, [(name[:100], category, t) for (name, category), t in top], exposed, wall / 1000 / steps


def union_length(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) spans."""
    total, covered_until = 0.0, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    return total


def push_to_hub(path: Path, repo: str, log: RunLog):
    """A failed upload must never lose a finished run: the checkpoint is already on disk."""
    try:
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_file(path_or_fileobj=str(path), path_in_repo="model.pt", repo_id=repo)
        log.line(f"pushed {path} to https://huggingface.co/{repo}")
    except Exception as e:  # noqa: BLE001 - any failure here is only a warning
        log.line(f"WARNING: could not push {path} to {repo}: {type(e).__name__}: {e}. The checkpoint stays on disk.")


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except BaseException:
        # End this process at once: torchrun then stops the other ranks instead of leaving them waiting
        # in a collective for this one.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
