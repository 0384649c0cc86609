"""plmrun: pretrain a protein masked language model against the wall clock.

    torchrun --standalone --nproc_per_node=N train.py --grad_accum K [--flag value ...]
    python train.py [--flag value ...]            # one process, GPU if there is one, else CPU

Global batch = N x K x tokens_per_rank tokens. The clock counts training only: compilation and warm-up happen
before it starts, and it pauses while the frozen validation set is evaluated and while a checkpoint is written.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._functorch import config as functorch_config

from data.tracks import TRACKS, track_of, track_problems
from dataloader import TrainLoader, cluster_sha256s, eval_batches, letter_frequency_totals, verified_fingerprint
from model import COMPILE_MODES, PRESETS, Model, compiled, cpu_attention_bytes, use_triton, window_size
from optimizer import build_optimizer, lr_multiplier, muon_momentum_at

REPO = Path(__file__).resolve().parent
SOURCE_FILES = ["train.py", "model.py", "triton_kernels.py", "optimizer.py", "dataloader.py", "data/tracks.py"]
SCHEMES = ("mask", "80/10/10")  # masking schemes: of --mask_scheme, and of the frozen sets


def flag(default, help: str, choices=None):
    """A hyperparameter: its default, its --help line and, if it takes one of a few values, those."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Hyperparameters:
    # data
    data: str = flag("data/sp2014", "shard folder made by the data/ scripts (python data/tracks.py lists the tracks')")
    tokens_per_rank: int = flag(65536, "tokens in one micro-batch on one GPU, a multiple of 128")
    grad_accum: int = flag(1, "micro-batches per rank per optimizer step")
    max_len: int = flag(1024, "longer training documents are cropped at a random offset")
    mask_rate: float = flag(0.15, "share of the residues masked in training (evaluation stays at the frozen 15%)")
    mask_scheme: str = flag("mask", "training masks: every chosen residue -> <mask>, or 80/10/10", SCHEMES)
    num_workers: int = flag(4, "loader processes per rank (lowered to the CPU cores there are)")
    sample_by_cluster: bool = flag(False, "each epoch one member of every training cluster, as ESM-2 trains (needs "
                                   "shards made with data/prepare.py --clusters or data/sp2014.py)")
    # model
    preset: str = flag("speedrun", "model size and shape (model.py's PRESETS)", list(PRESETS))
    compile: str = flag("model", "CUDA only: model (one graph, fastest), blocks (a graph per kind of block, compiles "
                        "faster), none (eager, debugging)", COMPILE_MODES)
    activation_memory: float = flag(1.0, "share of the activations the compiled backward keeps; < 1 recomputes the "
                                    "rest (less memory, slower)")
    # run length
    max_steps: int = flag(1000, "optimizer steps; a record run trains exactly this many")
    max_tokens: int = flag(0, "if > 0, stop after this many training tokens instead (experiments only)")
    target_val_loss: float = flag(0.0, "if > 0, the log says at which step the validation loss first reached it")
    stop_at_target: bool = flag(False, "stop at the first evaluation at --target_val_loss (experiments only: a "
                                "record run trains --max_steps)")
    val_every: int = flag(100, "steps between evaluations (0: only at the end)")
    log_every: int = flag(10, "steps between train-loss log lines (each one syncs the host)")
    seed: int = flag(0, "seed of the weights, the data order and the training masks")
    # optimization: learning rates and the schedule multiplying them
    muon_lr: float = flag(0.05, "Muon learning rate (hidden matrices)")
    muon_momentum: float = flag(0.95, "Muon momentum after its warm-up")
    muon_momentum_start: float = flag(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = flag(300, "steps of the linear Muon momentum warm-up")
    muon_weight_decay: float = flag(0.0, "Muon decoupled weight decay")
    normuon: bool = flag(False, "NorMuon: each row of Muon's update evened out by its running RMS, its norm kept")
    embed_lr: float = flag(0.3, "Adam learning rate of the embeddings")
    head_lr: float = flag(0.008, "Adam learning rate of the LM head")
    scalar_lr: float = flag(0.04, "Adam learning rate of the scalars (residual and skip weights)")
    adam_beta1: float = flag(0.8, "Adam beta1")
    adam_beta2: float = flag(0.95, "Adam beta2")
    warmup_frac: float = flag(0.02, "linear learning-rate warm-up, fraction of the run")
    cooldown_frac: float = flag(0.45, "linear decay to zero over this last fraction of the run")
    window_start: int = flag(1024, "sliding-window size at step 0, grown linearly to --max_len by the end")
    # bookkeeping
    log_dir: str = flag("logs", "folder of the run logs (RUN_ID.txt and its .jsonl twin)")
    save_every: int = flag(0, "steps between checkpoints (0: only the final one)")
    checkpoint_dir: str = flag("checkpoints", "checkpoints go to CHECKPOINT_DIR/RUN_ID/step_NNNNNN.pt")
    keep_checkpoints: int = flag(3, "checkpoints of this run kept (the latest)")
    resume: str = flag("", "checkpoint to continue from (or to evaluate, with --eval_only)")
    eval_only: bool = flag(False, "evaluate --resume on the frozen validation and test sets, then stop")
    wandb_project: str = flag("", "also log to this Weights & Biases project (offline without WANDB_API_KEY)")
    hf_repo: str = flag("", "push the final checkpoint to this Hugging Face model repo")
    bench_steps: int = flag(0, "> 0: after warm-up, time this many steps, profile 3 more, report, stop")


class RunError(Exception):
    """An expected failure (bad input, data or checkpoint; a diverged run): its message says what to do."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def __init__(self, prog):  # wide enough that most flags explain themselves in one line
        super().__init__(prog, max_help_position=36, width=160)


def parse_args(argv=None) -> Hyperparameters:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(Hyperparameters):
        kind = {"type": parse_bool, "nargs": "?", "const": True} if f.type is bool else {"type": f.type}
        parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"].replace("%", "%%"), choices=f.metadata["choices"],
                            metavar=None if f.metadata["choices"] else f.type.__name__.upper(), **kind)
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


def check_args(args: Hyperparameters) -> list[str]:
    """Every flag is checked before any work starts, so a typo never costs a compile."""
    p = []
    for name in ("tokens_per_rank", "grad_accum", "max_len", "max_steps", "log_every", "keep_checkpoints",
                 "window_start"):
        if getattr(args, name) <= 0:
            p.append(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("max_tokens", "val_every", "save_every", "num_workers", "muon_momentum_warmup_steps", "bench_steps"):
        if getattr(args, name) < 0:
            p.append(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.tokens_per_rank % 128:
        p.append(f"--tokens_per_rank must be a multiple of 128 (the attention block size), got {args.tokens_per_rank}")
    if args.tokens_per_rank < args.max_len:
        p.append(f"--tokens_per_rank ({args.tokens_per_rank}) must hold one document of --max_len ({args.max_len})")
    for name in ("compile", "mask_scheme", "preset"):
        choices = next(f.metadata["choices"] for f in dataclasses.fields(args) if f.name == name)
        if getattr(args, name) not in choices:
            p.append(f"--{name} must be one of {', '.join(choices)}, got {getattr(args, name)!r}")
    if not 0 <= args.activation_memory <= 1:
        p.append(f"--activation_memory must be in [0, 1], got {args.activation_memory}")
    if not 0 < args.mask_rate < 1:
        p.append(f"--mask_rate must be in (0, 1), got {args.mask_rate}")
    if not (0 <= args.warmup_frac <= 1 and 0 <= args.cooldown_frac <= 1 and args.warmup_frac + args.cooldown_frac <= 1):
        p.append("--warmup_frac and --cooldown_frac must lie in [0, 1] and add up to at most 1")
    if args.target_val_loss < 0:
        p.append(f"--target_val_loss must be >= 0, got {args.target_val_loss}")
    if args.stop_at_target and not args.target_val_loss:
        p.append("--stop_at_target needs --target_val_loss")
    if args.eval_only and not args.resume:
        p.append("--eval_only needs --resume PATH (the checkpoint to evaluate)")
    if args.resume and not Path(args.resume).is_file():
        p.append(f"--resume {args.resume}: no such checkpoint file")
    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        builds = [f"    {t.build} --out {data}" for t in TRACKS.values() if Path(t.data) == data] or [
            "    python data/prepare.py --fasta FILE --out DIR --name NAME    (your own sequences)",
            "    python data/tracks.py                                     (the tracks and their data)"]
        p.append(f"--data {data}: no shard folder there (no manifest.json). Make it with\n" + "\n".join(builds))
    return p


# ----------------------------------------------------------------------------------------------------------------
# logging: a text log that holds everything needed to reproduce the run, and a JSONL twin for tools

class RunLog:
    """RUN_ID.running.txt (+ .jsonl) while the run lasts, renamed RUN_ID.txt when it ends well or RUN_ID.failed.txt
    when it fails, so no tool takes an unfinished log for a finished one."""

    def __init__(self, args: Hyperparameters, master: bool, run_id: str):
        self.master, self.wandb = master, None
        if not master:
            return
        self.folder, self.run_id = Path(args.log_dir), run_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.txt = open(self.path("running", ".txt"), "w")
        self.jsonl = open(self.path("running", ".jsonl"), "w")
        if args.wandb_project:
            import wandb  # only when asked for: training never needs it
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.wandb = wandb.init(project=args.wandb_project, name=run_id, config=dataclasses.asdict(args),
                                    mode=mode, dir=args.log_dir)

    def path(self, state: str, suffix: str) -> Path:
        return self.folder / f"{self.run_id}{'.' + state if state else ''}{suffix}"

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
        self.header(text, **record)
        if record and self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def close(self, ok: bool):
        if not self.master or self.txt.closed:
            return
        self.txt.close()
        self.jsonl.close()
        for suffix in (".txt", ".jsonl"):
            os.replace(self.path("running", suffix), self.path("" if ok else "failed", suffix))
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


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: written atomically (temporary name, then rename) into a folder of their run, the last few kept

def save_checkpoint(path: Path, state: dict, keep: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # the folder is this run's alone: no other run writes this name
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
                         "short? train.py keeps the last --keep_checkpoints of a run in CHECKPOINT_DIR/RUN_ID/: use "
                         "an earlier one") from None
    if not (isinstance(ckpt, dict) and {"model", "data_sha256"} <= ckpt.keys()
            and isinstance(ckpt.get("hyperparameters"), dict) and "preset" in ckpt["hyperparameters"]):
        raise ValueError(f"{path} is not a checkpoint written by train.py (no model weights, hyperparameters or "
                         "data fingerprint)")
    return ckpt


def resume_problems(ckpt: dict, args: Hyperparameters, world: int, data_hash: str) -> list[str]:
    """What stops a run from continuing `ckpt` exactly, each with the flag that fixes it."""
    saved, p = ckpt["hyperparameters"], []
    if saved["preset"] != args.preset:
        p.append(f"it holds a {saved['preset']!r} model, not {args.preset!r}; pass --preset {saved['preset']}")
    if args.eval_only:
        return p
    saved_world = len(ckpt.get("loader", [None]))
    if saved_world != world:
        p.append(f"it was written by {saved_world} rank(s), this run has {world}; run it with "
                 f"torchrun --nproc_per_node={saved_world} (or the same number of ranks over several nodes)")
    for name in ("tokens_per_rank", "grad_accum", "max_len", "seed", "sample_by_cluster", "normuon"):
        was = saved.get(name, False)  # checkpoints older than the two switches ran without them
        if was != getattr(args, name):
            p.append(f"it was trained with --{name} {was}, not {getattr(args, name)}; pass --{name} {was}")
    if ckpt["data_sha256"] != data_hash:
        p.append(f"it was trained on other data (sha256 {ckpt['data_sha256']}) than --data {args.data} ({data_hash}); "
                 "resume with the data it was trained on")
    return p


def rng_states() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# ----------------------------------------------------------------------------------------------------------------
# frozen evaluation: metrics summed over every masked token of a set, on all ranks

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


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f}min" if seconds >= 600 else f"{seconds:.0f}s"


# ----------------------------------------------------------------------------------------------------------------
# one run: Trainer(args) sets it up; main() then calls warm_up(), train() and finish() in turn

class Trainer:
    def __init__(self, args: Hyperparameters):
        problems = check_args(args)
        if problems:
            raise RunError("\n  ".join(problems))
        self.args = a = args
        # processes and devices
        self.distributed = "RANK" in os.environ
        self.rank, self.world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if self.distributed else (0, 1)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        cuda = self.device.type == "cuda"
        if self.distributed:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=self.device if cuda else None)
        self.master = self.rank == 0
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        cpu_bytes = cpu_attention_bytes(PRESETS[a.preset], a.tokens_per_rank)
        if not cuda and cpu_bytes > os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2:
            raise RunError(f"--tokens_per_rank {a.tokens_per_rank} needs about {cpu_bytes / 2**30:.0f} GiB "
                           f"on the CPU, which holds the {a.tokens_per_rank} x {a.tokens_per_rank} attention scores of "
                           f"each of {a.preset}'s heads at once; pass --tokens_per_rank 4096, or train on a GPU")

        # everything that can be refused is checked before anything is logged or built
        self.run_id = self.broadcast(str(uuid.uuid4()))
        try:  # rank 0 checks every shard against the manifest; every rank then stops with its error, if any
            data_hash = verified_fingerprint(a.data) if self.master else None
        except ValueError as e:
            data_hash = e
        self.data_hash = self.broadcast(data_hash)
        if isinstance(self.data_hash, Exception):
            raise RunError(str(self.data_hash))
        try:
            self.clusters = cluster_sha256s(a.data) if a.sample_by_cluster else None
        except ValueError as e:
            raise RunError(str(e)) from None
        self.ckpt = None
        if a.resume:
            try:
                self.ckpt = load_checkpoint(a.resume)
            except ValueError as e:
                raise RunError(str(e)) from None
            problems = resume_problems(self.ckpt, a, self.world, self.data_hash)
            if problems:
                raise RunError(f"--resume {a.resume} cannot continue here: " + "; ".join(problems))
        self.global_batch = self.world * a.grad_accum * a.tokens_per_rank
        self.total_steps = a.max_steps if not a.max_tokens else min(a.max_steps, math.ceil(a.max_tokens / self.global_batch))
        self.checkpoint_dir = Path(a.checkpoint_dir) / self.run_id
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.num_workers = min(a.num_workers, max(len(os.sched_getaffinity(0)) // local_world - 1, 0))
        self.log = self.loader = None

    def start(self):
        """Open the log, write its head, build what the run needs."""
        self.log = RunLog(self.args, self.master, self.run_id)
        self.write_header()
        self.build()

    def broadcast(self, value):
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        box = [value if self.master else None]
        dist.broadcast_object_list(box)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's value, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def write_header(self):
        a, log = self.args, self.log
        log.header("=" * 100)
        for name in SOURCE_FILES:
            log.header(f"==> {name} <==\n{(REPO / name).read_text()}")
        log.header("=" * 100)
        log.header("command: " + " ".join([sys.executable] + sys.argv) + f"  (world size {self.world})")
        log.header("hyperparameters: " + json.dumps(dataclasses.asdict(a)))
        log.header(environment())
        devices = self.gather(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu")
        track = track_of(self.data_hash, dataclasses.asdict(a))
        problems = track and track_problems(track, self.data_hash, dataclasses.asdict(a), self.world, devices)
        track_line = ("none (no track has these data and target)" if track is None else
                      track.name if not problems else f"none (not {track.name}: {'; '.join(problems)})")
        if self.clusters:
            log.header("clusters sha256: " + " ".join(self.clusters))
        date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        log.header(f"date: {date}\ndata sha256: {self.data_hash}\ndevices: {', '.join(devices)}\ntrack: {track_line}",
                   kind="run", run_id=self.run_id, date=date, world_size=self.world, devices=devices,
                   hyperparameters=dataclasses.asdict(a), data_sha256=self.data_hash, clusters_sha256=self.clusters)

    def build(self):
        """The model, optimizer, frozen evaluation sets and training loader."""
        a, device = self.args, self.device
        torch.manual_seed(a.seed)
        self.raw_model = Model(dataclasses.replace(PRESETS[a.preset], max_len=a.max_len)).to(device)
        functorch_config.activation_memory_budget = a.activation_memory  # read when the backward is compiled
        self.model = compiled(self.raw_model, a.compile if device.type == "cuda" else "none")
        self.optimizer = build_optimizer(self.raw_model, muon_lr=a.muon_lr, muon_momentum=a.muon_momentum,
                                         muon_weight_decay=a.muon_weight_decay, embed_lr=a.embed_lr,
                                         head_lr=a.head_lr, scalar_lr=a.scalar_lr, betas=(a.adam_beta1, a.adam_beta2),
                                         normuon=a.normuon)
        shards = {s: sorted(Path(a.data).glob(f"*_{s}_*.bin")) for s in ("train", "valid", "test")}
        self.eval_sets = {(split, scheme): [b.to(device) for b in eval_batches(
            shards[split], a.tokens_per_rank, scheme=scheme, max_len=a.max_len)[self.rank::self.world]]
            for split in ("valid", "test") for scheme in SCHEMES}
        self.full_window = torch.tensor(a.max_len, dtype=torch.int32, device=device)
        totals = letter_frequency_totals(shards["train"][0], self.eval_sets["valid", "mask"], device)
        loss_sum, count = all_reduce_sum(totals).tolist()
        self.baseline = loss_sum / count
        self.loader = TrainLoader(shards["train"], a.tokens_per_rank, rank=self.rank, world_size=self.world,
                                  seed=a.seed, max_len=a.max_len, mask_rate=a.mask_rate, mask_scheme=a.mask_scheme,
                                  num_workers=self.num_workers, pin_memory=device.type == "cuda",
                                  sample_by_cluster=a.sample_by_cluster)
        # every window size the run uses, on the device up front: a per-step copy from pageable host memory would sync
        self.windows = {w: torch.tensor(w, dtype=torch.int32, device=device)
                        for w in {self.window_size(s) for s in range(self.total_steps + 1)}}
        workers = "" if self.num_workers == a.num_workers else f" (--num_workers {a.num_workers} lowered to the cores)"
        self.log.line(f"model: {a.preset} {self.raw_model.num_params():,} parameters | global batch "
                      f"{self.global_batch:,} tokens = {self.world} ranks x {a.grad_accum} micro-batches x "
                      f"{a.tokens_per_rank:,} | {self.total_steps} steps | device {device} | {self.num_workers} "
                      f"loader workers per rank{workers} | QK-norm + rotary and MLP: "
                      f"{'Triton ops' if use_triton(device) else 'formulas'} | letter-frequency baseline: "
                      f"val_loss {self.baseline:.4f}")
        if self.master:
            self.log.line(f"log: {self.log.path('running', '.txt')} (renamed {self.run_id}.txt when the run ends) | "
                          f"checkpoints: {self.checkpoint_dir}/")

    def window_size(self, step: int) -> int:
        return window_size(step, self.total_steps, self.args.window_start, self.args.max_len)

    def run_evals(self, splits, schemes=SCHEMES) -> dict:
        results = {}
        for split in splits:
            for scheme in schemes:
                r = evaluate(self.model, self.eval_sets[split, scheme], self.full_window)
                key = metric_key(split, scheme)
                results[f"{key}_loss"], results[f"{key}_accuracy"] = r["loss"], r["accuracy"]
        return results

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step. The loss is summed over the masked tokens of every micro-batch and rank and divided
        by their count, so each token weighs the same however they fall into buffers. Returns this rank's share of
        the step's loss as a device tensor (no host sync): summed over ranks, it is the step's loss."""
        a = self.args
        lr = lr_multiplier(step, self.total_steps, a.warmup_frac, a.cooldown_frac)
        momentum = muon_momentum_at(step, a.muon_momentum_start, a.muon_momentum, a.muon_momentum_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr
            if "momentum" in group:
                group["momentum"] = momentum
        window = self.windows[self.window_size(step)]
        batches = [next(self.loader).to(self.device) for _ in range(a.grad_accum)]
        count = all_reduce_sum(sum((b.targets != -100).sum() for b in batches).float()).clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for b in batches:
            loss = self.model(b.input_ids, b.doc_ids, b.mask_idx, b.targets, window)
            (loss * (self.world / count)).backward()  # the optimizer averages gradients over ranks
            loss_sum += loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / count

    def warm_up(self) -> float:
        """Compile every shape the run uses on throwaway steps, restore the initial state, then load the checkpoint
        to resume, if any. Returns the seconds it took."""
        a, ckpt = self.args, self.ckpt
        self.log.line("compiling and warming up (a minute or two the first time on a GPU; compiled code is cached)")
        t = time.perf_counter()
        initial = {"model": copy.deepcopy(self.raw_model.state_dict()),
                   "optimizer": copy.deepcopy(self.optimizer.state_dict()), "loader": self.loader.state_dict(),
                   "rng": rng_states()}
        for step in range(2):
            self.train_step(step)
        evaluate(self.model, self.eval_sets["valid", "mask"][:1], self.full_window)  # every eval batch has its shapes
        self.load_state(initial, initial["loader"])
        # where the loop starts: the step, the clock, the first step at the target, and the training loss summed
        # over all ranks since the last log line (all kept in checkpoints)
        self.start_step, self.train_ms, self.target_reached, pending_loss, self.loss_steps = 0, 0.0, None, 0.0, 0
        if ckpt:
            self.load_state(ckpt, ckpt["loader"][self.rank])
            self.start_step, self.train_ms, self.loss_steps = ckpt["step"], ckpt["train_ms"], ckpt["loss_steps"]
            self.target_reached = ckpt["target_reached"]
            pending_loss = ckpt["pending_loss"] if self.master else 0.0  # all-reduced at the next log line
            self.log.line(f"resumed from {a.resume} at step {self.start_step} after {self.train_ms / 1000:.2f}s of "
                          "training")
        self.loss_acc = torch.tensor(pending_loss, device=self.device)
        self.saved_step = self.start_step
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        compile_s = time.perf_counter() - t
        self.log.line(f"compile and warm-up: {compile_s:.1f}s")
        return compile_s

    def load_state(self, state: dict, loader_state: dict):
        """Model, optimizer, loader and random generators as `state` (a checkpoint, or warm_up's copy) has them."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(loader_state)
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def train(self) -> int:
        """The training loop, the only place the clock runs. Step s's log line, evaluation and checkpoint all come
        after its s optimizer steps and in that order, so a run resumed from step s's checkpoint starts with step
        s + 1's work and its log continues the interrupted one line for line. Returns the last step."""
        a, step = self.args, self.start_step
        self.sync()
        t0 = time.perf_counter()
        while True:
            last = step == self.total_steps
            if step > self.start_step:
                evaluate_now = last or (a.val_every and step % a.val_every == 0)
                log_now = evaluate_now or step % a.log_every == 0
                save_now = a.save_every and step % a.save_every == 0 and not last
                if log_now or save_now:
                    self.sync()
                    self.train_ms += 1000 * (time.perf_counter() - t0)
                    if log_now:
                        self.log_step(step, evaluate_now)
                    if save_now:  # off the clock, like evaluation
                        self.save(step)
                    self.sync()
                    t0 = time.perf_counter()
            if last or (a.stop_at_target and self.target_reached):
                return step
            self.loss_acc += self.train_step(step)
            self.loss_steps += 1
            step += 1

    def log_step(self, step: int, evaluate_now: bool):
        a = self.args
        record = {"step": step, "train_time_ms": self.train_ms, "tokens": step * self.global_batch}
        text = f"step:{step}/{self.total_steps}"
        if self.loss_steps:
            train_loss = all_reduce_sum(self.loss_acc.clone()).item() / self.loss_steps
            if not math.isfinite(train_loss):
                raise RunError(f"the training loss is {train_loss} at step {step} (non-finite training loss). The "
                               f"last checkpoint in {self.checkpoint_dir} (if any) holds the last good state; try a "
                               "lower learning rate.")
            record["train_loss"] = train_loss
            text += f" train_loss:{train_loss:.4f}"
            self.loss_acc.zero_()
            self.loss_steps = 0
        if evaluate_now:
            results = self.run_evals(["valid"], ["mask"])  # the 80/10/10 loss only at the end: half the pause
            record.update(val_loss=results["valid_loss"], val_accuracy=results["valid_accuracy"])
            text += f" val_loss:{results['valid_loss']:.4f}"
            if a.target_val_loss and results["valid_loss"] <= a.target_val_loss and not self.target_reached:
                self.target_reached = (step, self.train_ms)
        tokens_per_sec = step * self.global_batch / (self.train_ms / 1000) if self.train_ms else 0.0
        record.update(step_avg_ms=self.train_ms / step, tokens_per_sec=tokens_per_sec)
        left = (self.total_steps - step) * self.train_ms / step / 1000
        text += (f" train_time:{self.train_ms:.0f}ms step_avg:{record['step_avg_ms']:.2f}ms"
                 f" tokens_per_sec:{tokens_per_sec:.0f} left:{duration(left)}")
        self.log.line(text, **record)

    def save(self, step: int):
        pending = all_reduce_sum(self.loss_acc.clone()).item()
        finite = torch.stack([torch.isfinite(p).all() for p in self.raw_model.parameters()])
        if not (finite.all().item() and math.isfinite(pending)):  # a diverged state never replaces a good checkpoint
            raise RunError(f"non-finite training loss or weights at step {step}; the last good checkpoint stays in "
                           f"{self.checkpoint_dir}. Try a lower learning rate.")
        loader_states = self.gather(self.loader.state_dict())
        optimizer_state = self.optimizer.state_dict()  # a collective: every rank gathers the Muon momenta
        if self.master:
            save_checkpoint(self.checkpoint_dir / f"step_{step:06d}.pt",
                            {"model": self.raw_model.state_dict(), "optimizer": optimizer_state,
                             "loader": loader_states, "rng": rng_states(), "step": step, "train_ms": self.train_ms,
                             "pending_loss": pending, "loss_steps": self.loss_steps,
                             "target_reached": self.target_reached, "data_sha256": self.data_hash,
                             "hyperparameters": dataclasses.asdict(self.args), "run_id": self.run_id},
                            self.args.keep_checkpoints)
        self.saved_step = step

    def finish(self, step: int) -> dict:
        """The final evaluations (validation and test, both masking schemes), the outcome, the final checkpoint."""
        a, log = self.args, self.log
        final = self.run_evals(["valid", "test"])
        if self.device.type == "cuda":
            log.line(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                     f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved")
        log.line(" ".join(f"{k}:{v:.4f}" for k, v in final.items())
                 + f" (letter-frequency baseline: valid_loss {self.baseline:.4f})", **final)
        reached = self.target_reached
        trained = f"trained {step} steps in {self.train_ms / 1000:.2f}s"
        if not a.target_val_loss:
            outcome = f"no target set; {trained}"
        elif reached:
            outcome = (f"target val_loss {a.target_val_loss} first reached at step {reached[0]} after "
                       f"{reached[1] / 1000:.2f}s of training ({reached[0] * self.global_batch:,} tokens); {trained}")
        else:
            outcome = f"target val_loss {a.target_val_loss} NOT reached; {trained}"
        log.line(outcome, target_reached=bool(reached), target_step=reached and reached[0],
                 target_time_ms=reached and reached[1], final_step=step, max_steps=self.total_steps,
                 train_time_ms=self.train_ms)
        if self.saved_step != step:
            self.save(step)
        if self.master and a.hf_repo:  # a failed upload must never lose a finished run: its checkpoint is on disk
            path = self.checkpoint_dir / f"step_{step:06d}.pt"
            try:
                from tools.hf import push_to_hub  # bookkeeping, not among the logged sources (a rebuilt run lacks it)
                log.line(f"pushed {path} to {push_to_hub(path, a.hf_repo)}")
            except Exception as e:  # noqa: BLE001 - any failure here is only a warning
                log.line(f"WARNING: could not push {path} to {a.hf_repo}: {type(e).__name__}: {e}. The checkpoint "
                         "stays on disk.")
        return final

    def evaluate_checkpoint(self) -> dict:
        self.raw_model.load_state_dict(self.ckpt["model"])
        results = self.run_evals(["valid", "test"])
        self.log.line(" ".join(f"{k}:{v:.4f}" for k, v in results.items()), **results)
        return results

    def close(self, ok: bool):
        if self.log:
            self.log.close(ok)
        if self.loader:
            self.loader.close()


def main(args: Hyperparameters) -> dict:
    trainer = Trainer(args)
    ok = False
    try:
        trainer.start()
        if args.eval_only:
            result = trainer.evaluate_checkpoint()
        else:
            compile_s = trainer.warm_up()
            if args.bench_steps:
                from tools.bench import benchmark  # not embedded in the logs: it never trains
                result = benchmark(trainer, compile_s)
            else:
                result = trainer.finish(trainer.train())
        ok = True
        return result
    finally:
        trainer.close(ok)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except RunError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # at once: torchrun then stops the other ranks instead of leaving them waiting in a collective
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
