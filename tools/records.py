"""Records: check an attempt, rebuild a run from its log, regenerate the README's leaderboard, plot runs, compare
two arms of an A/B.

    python -m tools.records check logs_to_keep/RECORD
    python -m tools.records reproduce logs_to_keep/RECORD/A.txt --out /tmp/repro [--seed N] [--data PATH] [--run]
    python -m tools.records leaderboard          # rewrites README.md's record table: one row per logs_to_keep/ folder
    python -m tools.records plot logs/A.txt logs/B.txt --out runs.png [--size 1400x500]
    python -m tools.records compare --baseline logs/plain --variant logs/lever   # an A/B, paired by seed

A log is the `.txt` that train.py writes (full source, command, environment) with its `.jsonl` twin (the numbers).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from data.tracks import TRACKS, track_of, track_problems

REPO = Path(__file__).resolve().parent.parent
SEPARATOR = "=" * 100 + "\n"
SOURCE_HEADER = re.compile(r"^==> (\S+) <==\n", re.M)
BOARD_START, BOARD_END = "<!-- leaderboard: made by python -m tools.records leaderboard -->", "<!-- /leaderboard -->"
# The best public protein speedrun trainer on the same sp2014 track and one H100: (seconds of training, validation
# loss). Its log gives times only; it ran at 312,600 tokens/s, so its tokens are taken as seconds x 312,600
# (77M at the last point).
REFERENCE = [(67.0, 2.909), (120.0, 2.830), (181.0, 2.800), (246.5, 2.7835)]
REFERENCE_TOKENS_PER_SEC = 312_600


class RecordError(Exception):
    def __init__(self, message: str, table: str = ""):
        super().__init__(message)
        self.table = table  # the attempt's runs, when check got as far as their losses


def run_record(txt) -> dict:
    """A log's run record (hyperparameters, data hash, world size, date): there even if the run never finished (a
    run stopped and continued with --resume leaves one unfinished log per stop)."""
    jsonl = Path(txt).with_suffix(".jsonl")
    if not jsonl.is_file():
        raise RecordError(f"{txt}: a run log is a .txt with its .jsonl twin beside it; the .jsonl is missing")
    record = next((r for r in jsonl_records(jsonl) if r.get("kind") == "run"), None)
    if record is None:
        raise RecordError(f"{jsonl}: no run record; the run stopped before it started logging")
    return record


def jsonl_records(jsonl: Path) -> list[dict]:
    """The records of a log's .jsonl twin, but for a last line that a run in progress is still writing."""
    text = jsonl.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def log_text(txt: Path) -> str:
    """The text of a log that train.py wrote, finished or not."""
    if not txt.is_file() or not txt.with_suffix(".jsonl").is_file():
        raise RecordError(f"{txt}: a run log is a .txt with its .jsonl twin beside it; one of them is missing")
    text = txt.read_text()
    if text.count(SEPARATOR) < 2:
        raise RecordError(f"{txt}: no embedded source block; is it a log written by train.py?")
    return text


def log_sources(text: str) -> dict[str, str]:
    """The source files embedded in a log's text, by path."""
    parts = SOURCE_HEADER.split(text.split(SEPARATOR)[1])
    return {name: body[:-1] for name, body in zip(parts[1::2], parts[2::2])}  # header() added one newline


def folder_logs(folder: Path) -> list[Path]:
    """The run logs at the top of a folder: the .txt files with a .jsonl twin or an embedded source block, not a
    write-up's notes."""
    return sorted(p for p in folder.glob("*.txt") if p.with_suffix(".jsonl").exists() or SEPARATOR in p.read_text())


def log_paths(paths: list[Path]) -> list[Path]:
    """The command line's logs, a folder standing for the logs at its top (logs_to_keep/RECORD for its runs)."""
    logs = []
    for path in paths:
        if path.is_dir():
            found = folder_logs(path)
            if not found:
                below = sorted(str(sub) for sub in path.iterdir() if sub.is_dir() and folder_logs(sub))
                raise RecordError(f"{path}: no run logs (RUN_ID.txt beside RUN_ID.jsonl) at the top of this folder"
                                  + (f"; these subfolders hold some: {', '.join(below)}" if below else ""))
            logs += found
        else:
            logs.append(path)
    return logs


def unfinished(txt) -> bool:
    """Whether train.py named the log as that of a run in progress (RUN_ID.running.txt) or failed (.failed.txt)."""
    return Path(txt).stem.endswith((".running", ".failed"))


def read_run(txt) -> dict:
    """The sources, run record (hyperparameters, data hash, world size, date), evaluations and outcome of a log."""
    txt = Path(txt)
    if unfinished(txt):
        raise RecordError(f"{txt}: an unfinished log (train.py names a log RUN_ID.txt only when its run ends well)")
    text = log_text(txt)
    sources = log_sources(text)
    meta = run_record(txt)
    jsonl = txt.with_suffix(".jsonl")
    records = jsonl_records(jsonl)
    outcome = next((r for r in records if "target_reached" in r), None)
    final = next((r for r in records if "test_loss" in r), None)
    if outcome is None or final is None:
        raise RecordError(f"{jsonl}: the run did not finish (no final evaluation or outcome line)")
    gpus = re.search(r"^gpus \((\d+)\): (.*)$", text, re.M)
    gpus = gpus.group(2) if gpus else "unknown"
    # the GPUs the ranks ran on; logs older than that record have the host's nvidia-smi list only
    devices = meta.get("devices") or [g.split(",")[0] for g in gpus.split("; ")][:meta["world_size"]]
    return {"path": txt, "sources": sources, "meta": meta, "outcome": outcome, "final": final,
            "evals": [r for r in records if "val_loss" in r], "gpus": gpus, "devices": devices,
            "run_id": meta.get("run_id", txt.stem), "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "losses": [r.get("train_loss", r.get("val_loss")) for r in records if "step" in r]}


def evaluations(txt: Path) -> list[dict]:
    """A log's validation evaluations, whether or not its run finished (a run in progress, or a part of one that
    was continued with --resume)."""
    log_text(txt)
    return [r for r in jsonl_records(txt.with_suffix(".jsonl")) if "val_loss" in r]


def tokens_trained(run: dict) -> int:
    """Training tokens up to the run's last step: every step takes one global batch."""
    h = run["meta"]["hyperparameters"]
    return run["outcome"]["final_step"] * run["meta"]["world_size"] * h["grad_accum"] * h["tokens_per_rank"]


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom, through the regularized incomplete beta function."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def p_below(values: list[float], bound: float) -> float:
    """The one-sided t-test's p-value that the mean of `values` lies below `bound` (1 or 0 when they are all equal)."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    return float(mean >= bound) if std == 0 else t_sf((bound - mean) / (std / math.sqrt(len(values))), len(values) - 1)


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry that makes it converge fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1 + numerator * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + numerator / c
        c = c if abs(c) > 1e-300 else 1e-300
        f *= c * d
        if abs(c * d - 1) < 1e-14:
            break
    return front * (f - 1)


# Hyperparameters that say where and how results are written or how fast data are read, never what is trained:
# the runs of one attempt may differ in these (and in --seed) only.
OUTPUT_FLAGS = {"data", "log_dir", "checkpoint_dir", "save_every", "keep_checkpoints", "resume", "wandb_project",
                "hf_repo", "num_workers"}
# Those a rebuilt run takes at today's defaults: paths of the machine that ran it, and uploads that are not its own
FRESH_OUTPUTS = ("log_dir", "checkpoint_dir", "wandb_project", "hf_repo")


SAMENESS = {"run_id": "run id", "sha256": "content", "losses": "losses"}  # what makes two logs one run


def refuse_duplicates(runs: list, keys=tuple(SAMENESS)):
    """Each log counts once: no two the same in any of `keys` (run id, content, losses)."""
    for key in keys:
        what = SAMENESS[key]
        seen = {}
        for run in runs:
            value = json.dumps(run[key])
            if value in seen:
                raise RecordError(f"{run['path']}: the same run as {seen[value]} (same {what}): a log counts once")
            seen[value] = run["path"]


def one_configuration(runs: list, what: str):
    """Refuse runs that are not one configuration: the same embedded sources, data, clusters and hyperparameters
    but the seed and where outputs went."""
    first = runs[0]
    for run in runs[1:]:
        for name in sorted(set(first["sources"]) | set(run["sources"])):
            if first["sources"].get(name) != run["sources"].get(name):
                raise RecordError(f"{run['path']}: its {name} differs from that of {first['path']}")
        for key, other in [("data_sha256", "trained on other data (sha256"),  # clusters: None without sampling
                           ("clusters_sha256", "sampled its training documents by other clusters (cluster files")]:
            if run["meta"].get(key) != first["meta"].get(key):
                raise RecordError(f"{run['path']}: {other} {run['meta'].get(key)}) than {first['path']} "
                                  f"({first['meta'].get(key)})")
        h, h0 = run["meta"]["hyperparameters"], first["meta"]["hyperparameters"]
        differ = sorted(k for k in set(h) | set(h0) if k not in OUTPUT_FLAGS | {"seed"} and h.get(k) != h0.get(k))
        if differ:
            raise RecordError(f"{run['path']}: its hyperparameters differ from those of {first['path']} in "
                              + ", ".join(f"--{k} ({h.get(k)} vs {h0.get(k)})" for k in differ)
                              + f"; {what} changes nothing but --seed")


def refuse_early_stops(runs: list):
    """Every run trained its whole --max_steps: final losses compare only at the steps their schedules end on."""
    for run in runs:
        h = run["meta"]["hyperparameters"]
        if h.get("stop_at_target") or run["outcome"]["final_step"] < h["max_steps"]:
            raise RecordError(f"{run['path']}: stopped at step {run['outcome']['final_step']} of --max_steps "
                              f"{h['max_steps']}; a record run trains every step (the target only labels the log)")


def check(paths: list, tracks: dict = TRACKS) -> dict:
    """One attempt under the record rules: runs of the same code, data and hyperparameters but the seed, seeds
    0..n-1 (n >= 3), every run trained its full --max_steps on its track's data, constants and hardware, and the
    mean final validation loss below the track's target with p < 0.01 (one-sided t-test). Its time is the mean
    training time to the final step."""
    runs = [read_run(p) for p in paths]
    if len(runs) < 3:
        raise RecordError(f"an attempt needs at least 3 runs for the t-test, got {len(runs)}")
    refuse_duplicates(runs)
    seeds = sorted(run["meta"]["hyperparameters"]["seed"] for run in runs)
    if seeds != list(range(len(runs))):
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        missing = sorted(set(range(len(runs))) - set(seeds))
        raise RecordError(f"an attempt's runs are seeds 0..{len(runs) - 1}, each once, so that no run is left out; "
                          f"got seeds {seeds}" + (f" (twice: {repeated})" if repeated else "")
                          + (f" (missing: {missing})" if missing else ""))
    one_configuration(runs, "an attempt")
    first = runs[0]
    for run in runs[1:]:
        if (run["meta"]["world_size"], run["devices"]) != (first["meta"]["world_size"], first["devices"]):
            raise RecordError(f"{run['path']}: ran on {run['meta']['world_size']} rank(s) of {run['devices']}, "
                              f"{first['path']} on {first['meta']['world_size']} of {first['devices']}")
    refuse_early_stops(runs)
    h = first["meta"]["hyperparameters"]
    track = track_of(first["meta"]["data_sha256"], h, tracks)
    if track is None:
        raise RecordError(f"no track of data/tracks.py has these runs' data (sha256 {first['meta']['data_sha256']}) "
                          f"and --target_val_loss {h['target_val_loss']}")
    problems = track_problems(track, first["meta"]["data_sha256"], h, first["meta"]["world_size"], first["devices"])
    if problems:
        raise RecordError(f"the runs do not meet track {track.name}'s constants: " + "; ".join(problems))
    losses = [run["final"]["valid_loss"] for run in runs]
    seconds = [run["outcome"]["train_time_ms"] / 1000 for run in runs]
    mean, std = statistics.mean(losses), statistics.stdev(losses)
    target = track.target
    p = p_below(losses, target)
    result = {"track": track.name, "runs": len(runs), "target": target, "val_loss_mean": mean, "val_loss_std": std,
              "p_value": p, "time_mean_s": statistics.mean(seconds), "time_std_s": statistics.stdev(seconds)}
    table = ["| seed | final val loss | test loss | training time | first at the target | log |",
             "| --- | --- | --- | --- | --- | --- |"]
    for run in sorted(runs, key=lambda r: r["meta"]["hyperparameters"]["seed"]):
        o = run["outcome"]
        at = (f"step {o['target_step']}, {o['target_time_ms'] / 1000:.2f} s" if o.get("target_step") else
              "yes" if o["target_reached"] else "no")
        table.append(f"| {run['meta']['hyperparameters']['seed']} | {run['final']['valid_loss']:.4f} | "
                     f"{run['final']['test_loss']:.4f} | {o['train_time_ms'] / 1000:.2f} s | {at} | {run['path'].name} |")
    result["table"] = "\n".join(table)
    result["summary"] = (f"track {track.name}: {len(runs)} runs of {h['max_steps']} steps: val loss {mean:.4f} ± "
                         f"{std:.4f} (target {target}, one-sided p = {p:.2e}), time {result['time_mean_s']:.2f} ± "
                         f"{result['time_std_s']:.2f} s")
    if p >= 0.01:
        raise RecordError(f"the mean validation loss {mean:.4f} ± {std:.4f} of {len(runs)} runs is not below the "
                          f"target {target} with p < 0.01 (p = {p:.3g}); add runs (seeds {len(runs)}, "
                          f"{len(runs) + 1}, ...: `python -m tools.records reproduce LOG --out DIR --seed "
                          f"{len(runs)} --data PATH --run` runs one from one of these logs) or train further",
                          result["table"])
    return result


def compare(baseline_paths: list, variant_paths: list) -> dict:
    """An A/B paired by seed: each arm one configuration of whole runs, both on the same data and with the same
    seeds (each once, at least two). Per seed, the variant's final validation and test losses minus the baseline's;
    the one-sided paired t-test's p-value that the variant ends lower; the time a step of each arm and their ratio,
    the mean of the pairs' (a ratio that means something only for pairs run on one machine, as a same-call A/B)."""
    arms = {"baseline": [read_run(p) for p in baseline_paths], "variant": [read_run(p) for p in variant_paths]}
    refuse_duplicates(arms["baseline"] + arms["variant"], ("run_id", "sha256"))  # a lever of speed alone keeps losses
    by_seed = {}
    for name, runs in arms.items():
        refuse_duplicates(runs)
        one_configuration(runs, f"the {name} arm")
        refuse_early_stops(runs)
        by_seed[name] = {}
        for run in runs:
            seed = run["meta"]["hyperparameters"]["seed"]
            if seed in by_seed[name]:
                raise RecordError(f"the {name} arm has seed {seed} twice ({by_seed[name][seed]['path']} and "
                                  f"{run['path']}); an A/B pairs its runs by seed: keep one of each")
            by_seed[name][seed] = run
    seeds = sorted(by_seed["baseline"])
    if seeds != sorted(by_seed["variant"]):
        raise RecordError(f"an A/B pairs its runs by seed, but the arms have other seeds: baseline {seeds}, variant "
                          f"{sorted(by_seed['variant'])}; run the seeds that one arm lacks")
    if len(seeds) < 2:
        raise RecordError(f"an A/B needs at least 2 pairs of runs for the t-test, got {len(seeds)}")
    base, variant = arms["baseline"][0], arms["variant"][0]
    if base["meta"]["data_sha256"] != variant["meta"]["data_sha256"]:
        raise RecordError(f"{variant['path']}: trained on other data (sha256 {variant['meta']['data_sha256']}) than "
                          f"{base['path']} ({base['meta']['data_sha256']}): their validation losses do not compare; "
                          "run both arms on the same shards")
    pairs = [(by_seed["baseline"][s], by_seed["variant"][s]) for s in seeds]
    step_ms = lambda run: run["outcome"]["train_time_ms"] / run["outcome"]["final_step"]
    result = {"seeds": seeds, "step_ms": {name: statistics.mean(map(step_ms, arms[name])) for name in arms},
              "step_ratio": statistics.mean(step_ms(v) / step_ms(b) for b, v in pairs)}
    for split in ("valid", "test"):
        d = [v["final"][f"{split}_loss"] - b["final"][f"{split}_loss"] for b, v in pairs]
        result[split] = {"difference_mean": statistics.mean(d), "difference_std": statistics.stdev(d),
                         "p_value": p_below(d, 0.0)}
    hyperparameters = with_defaults([base["meta"]["hyperparameters"], variant["meta"]["hyperparameters"]])
    flags, files = differences(hyperparameters, [base["sources"], variant["sources"]], OUTPUT_FLAGS | {"seed"})
    lever = [f"--{k} {hyperparameters[0].get(k)} -> {hyperparameters[1].get(k)}" for k in flags] + files
    if base["meta"].get("clusters_sha256") != variant["meta"].get("clusters_sha256"):
        lever.append("the cluster files it sampled by")
    if (base["meta"]["world_size"], base["devices"]) != (variant["meta"]["world_size"], variant["devices"]):
        lever.append(f"its GPUs ({base['meta']['world_size']}x {base['devices'][0]} -> "
                     f"{variant['meta']['world_size']}x {variant['devices'][0]})")
    table = ["| seed | baseline val | variant val | variant - baseline | baseline test | variant test | "
             "baseline ms a step | variant ms a step |", "|" + " --- |" * 8]
    for seed, (b, v) in zip(seeds, pairs):
        table.append(f"| {seed} | {b['final']['valid_loss']:.4f} | {v['final']['valid_loss']:.4f} | "
                     f"{v['final']['valid_loss'] - b['final']['valid_loss']:+.4f} | {b['final']['test_loss']:.4f} | "
                     f"{v['final']['test_loss']:.4f} | {step_ms(b):.2f} | {step_ms(v):.2f} |")
    result["table"] = "\n".join(table)
    result["summary"] = "\n".join(
        [f"the variant differs in {', '.join(lever)}" if lever else "the arms differ in nothing: an A/A"]
        + [f"{split} loss, variant - baseline over {len(seeds)} seeds: {result[split]['difference_mean']:+.4f} ± "
           f"{result[split]['difference_std']:.4f} (one-sided p = {result[split]['p_value']:.2e} that the variant "
           "ends lower)" for split in ("valid", "test")]
        + [f"time a step: variant {result['step_ms']['variant']:.2f} ms, baseline {result['step_ms']['baseline']:.2f} "
           f"ms ({result['step_ratio'] - 1:+.2%}, the mean of the pairs' ratios)"])
    return result


def train_defaults() -> dict:
    """Today's train.py hyperparameters at their defaults."""
    from train import Hyperparameters  # here, not at the top: check and the leaderboard need no torch
    return dataclasses.asdict(Hyperparameters())


def command(run: dict, **changes) -> list[str]:
    """The run's command, every hyperparameter spelled out (the logged train.py's defaults need not be today's),
    with `changes` (e.g. seed=3) in place of the logged values."""
    logged = run["meta"]["hyperparameters"]
    if changes.keys() - logged.keys():
        raise RecordError(f"{run['path']}: its run has no hyperparameter {', '.join(sorted(changes.keys() - logged))}")
    flags = [f"--{k}={changes.get(k, v)}" for k, v in logged.items()]
    world = run["meta"]["world_size"]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
                                   if world > 1 else [])  # torchrun of this Python, not whichever is on PATH
    return launcher + ["train.py"] + flags


def reproduce(path, out: Path, run_it: bool, seed: int | None = None, data: Path | None = None) -> list[str]:
    """Write the log's source files into `out` and print (or run there) its exact command; with `seed`, that of
    another run of its attempt (the rules compare all else), with `data`, the shards found elsewhere. Its outputs go
    under `out` (logs/, checkpoints/), with no wandb project or hub repo: the logged paths are another machine's,
    and the uploads the original run's. The log may be unfinished: a run cut short is rebuilt whole."""
    path = Path(path)
    run = {"path": path, "sources": log_sources(log_text(path)), "meta": run_record(path)}
    out.mkdir(parents=True, exist_ok=True)
    for name, text in run["sources"].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    defaults = train_defaults()
    changes = {k: defaults[k] for k in FRESH_OUTPUTS if k in run["meta"]["hyperparameters"]}
    if seed is not None:
        changes["seed"] = seed
    if data is not None:
        changes["data"] = data.absolute()  # the command runs in `out`
    cmd = command(run, **changes)
    print(f"cd {shlex.quote(str(out))} && {shlex.join(cmd)}")
    logged, resumed = Path(run["meta"]["hyperparameters"]["data"]), run["meta"]["hyperparameters"].get("resume")
    if data is None and not (out / logged).is_dir():  # the command runs in `out`
        message = f"the run's --data {logged} is not there from {out}: pass --data PATH, the folder of its shards"
        if run_it:
            raise RecordError(message)
        print(f"({message})")
    if resumed:
        print(f"(it continued another run from the checkpoint {resumed}: it needs that file there; a whole run is "
              "rebuilt from the log of the first part)")
    if run_it:
        subprocess.run(cmd, cwd=out, check=True)
    return cmd


def leaderboard(logs: Path, readme: Path, tracks: dict = TRACKS) -> str:
    """The record table, written into readme between the leaderboard markers: one row per folder of `logs` whose
    runs pass `check` and that holds its write-up (README.md), by track, fastest mean time first; then the folders
    of attempts (runs with a target) that do not pass today's rules, each with the reason. Folders of runs without
    a target (a sweep, or a long run in several resumed parts), and those with no log at the top (a write-up whose
    logs lie in subfolders, one per device call), are not attempts and are left out."""
    rows, retired = [], []
    for folder in sorted(p for p in logs.iterdir() if p.is_dir()):
        paths = folder_logs(folder)
        if not any(run_record(p)["hyperparameters"]["target_val_loss"] for p in paths):
            continue
        link = f"[{folder.name}]({folder.relative_to(readme.parent).as_posix()})"
        try:
            result = check(paths, tracks)
        except RecordError as e:
            retired.append(f"- {link}: {e}")
            continue
        if not (folder / "README.md").is_file():
            raise RecordError(f"{folder} passes check but has no write-up: add its README.md (what changed, the "
                              "command, its runs, the check output)")
        run = read_run(paths[0])
        hardware = f"{run['meta']['world_size']}x {run['devices'][0]}"
        rows.append((result["track"], result["time_mean_s"], f"{result['time_mean_s']:.2f} ± {result['time_std_s']:.2f} s",
                     f"{result['val_loss_mean']:.4f} ± {result['val_loss_std']:.4f}",
                     f"{result['runs']} (p = {result['p_value']:.1e})", run["meta"]["hyperparameters"]["preset"],
                     hardware, f"{tokens_trained(run) / 1e6:.1f}M", run["meta"]["date"][:10],
                     f"[{folder.name}]({folder.relative_to(readme.parent).as_posix()}/README.md)"))
    table = ["| track | time | val loss | runs | model | hardware | tokens | date | write-up |", "|" + " --- |" * 9]
    table += ["| " + " | ".join([row[0], *row[2:]]) + " |" for row in sorted(rows)]
    if not rows:
        table.append("| no record yet |" + " |" * 8)
    if retired:
        table += ["", "Attempts that do not pass today's rules (`check` says why):", *retired]
    text = readme.read_text()
    if text.count(BOARD_START) != 1 or text.count(BOARD_END) != 1:
        raise RecordError(f"{readme} needs the markers {BOARD_START} and {BOARD_END} once each")
    head, rest = text.split(BOARD_START)
    readme.write_text(head + BOARD_START + "\n" + "\n".join(table) + "\n" + BOARD_END + rest.split(BOARD_END)[1])
    return "\n".join(table)


# and those that say how a run was watched or compiled (its graphs, not its model): left out of plot labels
UNLABELLED = OUTPUT_FLAGS | {"preset", "max_steps", "log_every", "val_every", "target_val_loss", "stop_at_target",
                             "compile"}


def with_defaults(hyperparameters: list[dict]) -> list[dict]:
    """Logged hyperparameters, a flag that an older log lacks at today's default: the code before the flag did what
    its default does."""
    defaults = train_defaults()
    return [{**defaults, **h} for h in hyperparameters]


def differences(hyperparameters: list[dict], sources: list[dict], ignore: set) -> tuple[list[str], list[str]]:
    """The hyperparameters outside `ignore`, and the embedded source files, in which runs differ: an A/B's lever."""
    flags = sorted(k for k in set().union(*hyperparameters) - ignore
                   if len({repr(h.get(k)) for h in hyperparameters}) > 1)
    files = sorted(name for name in set().union(*sources) if len({s.get(name) for s in sources}) > 1)
    return flags, files


def labels(runs: list) -> list[str]:
    """A legend entry per (path, evaluations, run record): the preset, the step count, then each hyperparameter in
    which the plotted runs differ, and each embedded source file that differs (as FILE@ the start of its sha256),
    so the lever of an A/B is in its label, be it a flag or code, then the log's id. Where the plotted runs differ
    in more than two files in all (other code versions, not one lever), each run's code is one digest over those
    files instead (sources@: of this plot's differing files, so the same code may read otherwise in another plot),
    to keep the legend short."""
    hyperparameters = with_defaults([meta["hyperparameters"] for _, _, meta in runs])
    sources = [log_sources(log_text(path)) for path, _, _ in runs]
    differ, changed = differences(hyperparameters, sources, UNLABELLED)
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:6]
    if len(changed) > 2:
        code = [f" sources@{digest(repr([(name, s.get(name)) for name in changed]))}" for s in sources]
    else:
        code = ["".join(f" {name}@{digest(s[name]) if name in s else 'none'}" for name in changed) for s in sources]
    return [f"{h['preset']} {h['max_steps']:,} steps" + "".join(f" {k}={h.get(k)}" for k in differ) + c
            + f" {path.stem[:8]}" for (path, _, _), h, c in zip(runs, hyperparameters, code)]


def plot(paths: list, out: Path, width: int = 1400, height: int = 500) -> Path:
    """A PNG of validation loss against training time (left) and training tokens (right), one line per log, with
    the target (the logs' --target_val_loss, else sp2014's) and, for sp2014's target, the reference trainer's curve."""
    paths = [Path(p) for p in paths]
    runs = [(p, evaluations(p), run_record(p)) for p in paths]  # all read first: a bad log fails fast
    import matplotlib  # only here: training and the other subcommands never need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(width / dpi, height / dpi), dpi=dpi, sharey=True,
                                          layout="constrained")
    for (path, evals, meta), label in zip(runs, labels(runs)):
        losses = [e["val_loss"] for e in evals]
        by_time.plot([e["train_time_ms"] / 1000 for e in evals], losses, marker="o", label=label)
        by_tokens.plot([e["tokens"] / 1e6 for e in evals], losses, marker="o", label=label)
    targets = {meta["hyperparameters"]["target_val_loss"] for _, _, meta in runs} - {0.0} or {TRACKS['sp2014'].target}
    if TRACKS["sp2014"].target in targets:  # the reference ran that track only
        seconds, losses = zip(*REFERENCE)
        reference = dict(color="black", linestyle="--", marker="x", label="best public trainer (1x H100)")
        by_time.plot(seconds, losses, **reference)
        by_tokens.plot([s * REFERENCE_TOKENS_PER_SEC / 1e6 for s in seconds], losses, **reference)
    for target in sorted(targets):
        for ax in (by_time, by_tokens):
            ax.axhline(target, color="red", linewidth=1, label=f"target {target}")
    by_time.set(xlabel="training time (s)", ylabel="validation loss")
    by_tokens.set(xlabel="training tokens (millions)")
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
    fig.legend(*by_time.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small")
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def pixels(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT in pixels, for --size."""
    try:
        width, height = map(int, text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels such as 1400x500, got {text!r}")
    if width < 200 or height < 200:
        raise argparse.ArgumentTypeError(f"the figure needs at least 200x200 pixels, got {text!r}")
    return width, height


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check the runs of one attempt").add_argument(
        "logs", nargs="+", type=Path, help="run logs (RUN_ID.txt), or a folder of them")
    r = sub.add_parser("reproduce", help="rebuild a run's sources and print or run its command")
    r.add_argument("log", type=Path)
    r.add_argument("--out", type=Path, required=True,
                   help="folder for the rebuilt source files, where the run writes its logs/ and checkpoints/")
    r.add_argument("--run", action="store_true", help="run the command there")
    r.add_argument("--seed", type=int, help="another seed of the run's attempt, in place of the logged one")
    r.add_argument("--data", type=Path, help="the shards' folder, in place of the logged path")
    b = sub.add_parser("leaderboard", help="regenerate README.md's record table")
    b.add_argument("--logs", type=Path, default=REPO / "logs_to_keep")
    b.add_argument("--readme", type=Path, default=REPO / "README.md")
    g = sub.add_parser("plot", help="plot validation loss against time and tokens, beside the reference")
    g.add_argument("logs", nargs="+", type=Path, help="run logs (RUN_ID.txt), or folders of them")
    g.add_argument("--out", type=Path, required=True, help="the PNG to write")
    g.add_argument("--size", type=pixels, default=(1400, 500), help="WIDTHxHEIGHT in pixels (default 1400x500)")
    c = sub.add_parser("compare", help="compare the two arms of an A/B, paired by seed")
    c.add_argument("--baseline", nargs="+", type=Path, required=True, help="its run logs, or a folder of them")
    c.add_argument("--variant", nargs="+", type=Path, required=True, help="its run logs, or a folder of them")
    a = p.parse_args(argv)
    if a.command == "check":
        result = check(log_paths(a.logs))
        print(result["table"] + "\n" + result["summary"])
        return result
    if a.command == "reproduce":
        return reproduce(a.log, a.out, a.run, a.seed, a.data)
    if a.command == "compare":
        result = compare(log_paths(a.baseline), log_paths(a.variant))
        print(result["table"] + "\n" + result["summary"])
        return result
    if a.command == "plot":
        return plot(log_paths(a.logs), a.out, *a.size)
    print(leaderboard(a.logs, a.readme))


if __name__ == "__main__":
    try:
        try:
            main()
        except RecordError as e:
            if e.table:
                print(e.table)
            sys.exit(f"records: {e}")
        finally:
            sys.stdout.flush()  # here, not at exit: a pipe's buffered output is written where a gone reader is caught
    except BrokenPipeError:  # the reader went away (`... | head -1`): no traceback, and none when Python flushes
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
