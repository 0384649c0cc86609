"""Records: check an attempt, rebuild a run from its log, regenerate the README's leaderboard.

    python -m tools.records check logs_to_keep/A.txt logs_to_keep/B.txt logs_to_keep/C.txt
    python -m tools.records reproduce logs_to_keep/A.txt --out /tmp/repro [--run]
    python -m tools.records leaderboard          # rewrites README.md's record table from logs_to_keep/

A log is the `.txt` that train.py writes (full source, command, environment) with its `.jsonl` twin (the numbers).
"""
import argparse
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEPARATOR = "=" * 100 + "\n"
SOURCE_HEADER = re.compile(r"^==> (\S+) <==\n", re.M)
BOARD_START, BOARD_END = "<!-- leaderboard: made by python -m tools.records leaderboard -->", "<!-- /leaderboard -->"


class RecordError(Exception):
    pass


def read_run(txt) -> dict:
    """The sources, run record (hyperparameters, data hash, world size, date), evaluations and outcome of a log."""
    txt = Path(txt)
    jsonl = txt.with_suffix(".jsonl")
    if not txt.is_file() or not jsonl.is_file():
        raise RecordError(f"{txt}: a run log is a .txt with its .jsonl twin beside it; one of them is missing")
    text = txt.read_text()
    if text.count(SEPARATOR) < 2:
        raise RecordError(f"{txt}: no embedded source block; is it a log written by train.py?")
    block = text.split(SEPARATOR)[1]
    parts = SOURCE_HEADER.split(block)
    sources = {name: body[:-1] for name, body in zip(parts[1::2], parts[2::2])}  # header() added one newline
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    meta = next((r for r in records if r.get("kind") == "run"), None)
    outcome = next((r for r in records if "target_reached" in r), None)
    final = next((r for r in records if "test_loss" in r), None)
    if meta is None or outcome is None or final is None:
        raise RecordError(f"{jsonl}: the run did not finish (no run record, final evaluation or outcome line)")
    gpus = re.search(r"^gpus \((\d+)\): (.*)$", text, re.M)
    return {"path": txt, "sources": sources, "meta": meta, "outcome": outcome, "final": final,
            "evals": [r for r in records if "val_loss" in r], "gpus": gpus.group(2) if gpus else "unknown"}


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom, through the regularized incomplete beta function."""
    tail = 0.5 * incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


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


def check(paths: list) -> dict:
    """One attempt: the same code and data in every run, every run at the target, and a mean final validation
    loss below the target with p < 0.01 (one-sided t-test over at least 3 runs)."""
    runs = [read_run(p) for p in paths]
    if len(runs) < 3:
        raise RecordError(f"an attempt needs at least 3 runs for the t-test, got {len(runs)}")
    first = runs[0]
    for run in runs[1:]:
        for name in sorted(set(first["sources"]) | set(run["sources"])):
            if first["sources"].get(name) != run["sources"].get(name):
                raise RecordError(f"{run['path']}: its {name} differs from that of {first['path']}")
        if run["meta"]["data_sha256"] != first["meta"]["data_sha256"]:
            raise RecordError(f"{run['path']}: trained on other data (sha256 {run['meta']['data_sha256']}) than "
                              f"{first['path']} ({first['meta']['data_sha256']})")
    targets = {run["meta"]["hyperparameters"]["target_val_loss"] for run in runs}
    if len(targets) != 1 or not targets.pop() > 0:
        raise RecordError("the runs must share one --target_val_loss > 0")
    target = first["meta"]["hyperparameters"]["target_val_loss"]
    for run in runs:
        if not run["outcome"]["target_reached"]:
            raise RecordError(f"{run['path']}: did not reach the target validation loss {target}")
    losses = [run["final"]["valid_loss"] for run in runs]
    seconds = [run["outcome"]["train_time_ms"] / 1000 for run in runs]
    mean, std = statistics.mean(losses), statistics.stdev(losses)
    p = (float(mean >= target) if std == 0 else
         t_sf((target - mean) / (std / math.sqrt(len(losses))), len(losses) - 1))
    result = {"runs": len(runs), "target": target, "val_loss_mean": mean, "val_loss_std": std, "p_value": p,
              "time_mean_s": statistics.mean(seconds), "time_std_s": statistics.stdev(seconds)}
    print(f"{len(runs)} runs: val loss {mean:.4f} ± {std:.4f} (target {target}, one-sided p = {p:.2e}), "
          f"time {result['time_mean_s']:.2f} ± {result['time_std_s']:.2f} s")
    if p >= 0.01:
        raise RecordError(f"the mean validation loss {mean:.4f} is not below the target {target} with p < 0.01 "
                          f"(p = {p:.3g}); add runs or train further")
    return result


def command(run: dict) -> list[str]:
    """The run's command, every hyperparameter spelled out: the logged train.py's defaults need not be today's."""
    flags = [f"--{k}={v}" for k, v in run["meta"]["hyperparameters"].items()]
    world = run["meta"]["world_size"]
    launcher = ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world > 1 else [sys.executable]
    return launcher + ["train.py"] + flags


def reproduce(path, out: Path, run_it: bool) -> list[str]:
    """Write the log's source files into `out` and print (or run there) its exact command."""
    run = read_run(path)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in run["sources"].items():
        (out / name).write_text(text)
    cmd = command(run)
    print(f"cd {shlex.quote(str(out))} && {shlex.join(cmd)}")
    data = Path(run["meta"]["hyperparameters"]["data"])
    if not data.is_absolute():
        print(f"(--data {data} is relative to where the run started: run from there or pass --data=PATH)")
    if run_it:
        subprocess.run(cmd, cwd=out, check=True)
    return cmd


def leaderboard(logs: Path, readme: Path) -> str:
    """The record table, one row per log in `logs` that reached its target, fastest first, written into readme
    between the leaderboard markers."""
    rows = []
    for txt in sorted(logs.glob("*.txt")):
        run = read_run(txt)
        if run["outcome"]["target_reached"]:
            h = run["meta"]["hyperparameters"]
            tokens = run["outcome"]["final_step"] * run["meta"]["world_size"] * h["grad_accum"] * h["tokens_per_rank"]
            rows.append((run["outcome"]["train_time_ms"] / 1000, run["final"]["valid_loss"], run["gpus"], tokens,
                         run["meta"]["date"][:10], txt.relative_to(readme.parent).as_posix()))
    table = ["| time | val loss | hardware | tokens | date | log |", "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {t:.2f} s | {loss:.4f} | {gpus} | {tokens / 1e6:.1f}M | {date} | [{Path(link).name}]({link}) |"
              for t, loss, gpus, tokens, date, link in sorted(rows)]
    if not rows:
        table.append("| no record yet | | | | | |")
    text = readme.read_text()
    if text.count(BOARD_START) != 1 or text.count(BOARD_END) != 1:
        raise RecordError(f"{readme} needs the markers {BOARD_START} and {BOARD_END} once each")
    head, rest = text.split(BOARD_START)
    readme.write_text(head + BOARD_START + "\n" + "\n".join(table) + "\n" + BOARD_END + rest.split(BOARD_END)[1])
    return "\n".join(table)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check the runs of one attempt").add_argument("logs", nargs="+", type=Path)
    r = sub.add_parser("reproduce", help="rebuild a run's sources and print or run its command")
    r.add_argument("log", type=Path)
    r.add_argument("--out", type=Path, required=True, help="folder for the rebuilt source files")
    r.add_argument("--run", action="store_true", help="run the command there")
    b = sub.add_parser("leaderboard", help="regenerate README.md's record table")
    b.add_argument("--logs", type=Path, default=REPO / "logs_to_keep")
    b.add_argument("--readme", type=Path, default=REPO / "README.md")
    a = p.parse_args(argv)
    if a.command == "check":
        return check(a.logs)
    if a.command == "reproduce":
        return reproduce(a.log, a.out, a.run)
    print(leaderboard(a.logs, a.readme))


if __name__ == "__main__":
    try:
        main()
    except RecordError as e:
        sys.exit(f"records: {e}")
