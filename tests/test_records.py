"""tools/records.py on real tiny CPU runs: checking an attempt, rebuilding a run from its log, the leaderboard, plots,
comparing the arms of an A/B."""
import dataclasses
import hashlib
import json
import os
import re
import shlex
import statistics
import struct
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
from test_train import REPO, tiny
from data.tracks import TRACKS, Track
from tools.records import (BOARD_END, BOARD_START, FRESH_OUTPUTS, OUTPUT_FLAGS, RecordError, check, command, compare,
                           labels, folder_logs, leaderboard, log_paths, plot, read_run, reproduce, run_record, t_sf)


@pytest.fixture(scope="module")
def attempt(small_shards, tmp_path_factory) -> list[Path]:
    """Three runs of one attempt (seeds 0, 1, 2) of 4 steps each, below a loose target from their first evaluation."""
    logs = tmp_path_factory.mktemp("logs_to_keep")
    for seed in range(3):
        train.main(tiny(small_shards, tmp_path_factory.mktemp(f"run{seed}"), seed=seed, max_steps=4, val_every=2,
                        target_val_loss=4.0, log_dir=str(logs)))
    return sorted(logs.glob("*.txt"))


@pytest.fixture(scope="module")
def tiny_tracks(attempt) -> dict:
    """A track for the tiny runs: their data, target, --max_len, cadence and (CPU) hardware."""
    fingerprint = json.loads(attempt[0].with_suffix(".jsonl").read_text().splitlines()[0])["data_sha256"]
    return {"tiny": Track("tiny", "", "", fingerprint, 4.0, 512, 2, 1, ("cpu",), 1024, "", "tiny test track")}


def copy_logs(paths, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, folder)
        shutil.copy(p.with_suffix(".jsonl"), folder)
    return [folder / p.name for p in paths]


def edit_jsonl(txt: Path, edit):
    jsonl = txt.with_suffix(".jsonl")
    jsonl.write_text("".join(json.dumps(edit(json.loads(line))) + "\n" for line in jsonl.read_text().splitlines()))


def test_student_t_tail_matches_the_tables():
    for t, df, p in [(2.015, 5, 0.05), (2.764, 10, 0.01), (6.965, 2, 0.01), (31.821, 1, 0.01), (0.0, 7, 0.5)]:
        assert t_sf(t, df) == pytest.approx(p, abs=2e-4)
    assert t_sf(-2.015, 5) == pytest.approx(0.95, abs=2e-4)


def test_check_accepts_an_attempt(attempt, tiny_tracks):
    result = check(attempt, tiny_tracks)
    assert result["runs"] == 3 and result["p_value"] < 0.01 and result["val_loss_mean"] < 4.0
    assert result["track"] == "tiny" and len(result["table"].splitlines()) == 2 + 3
    with pytest.raises(RecordError, match="no track of data/tracks.py has these runs' data"):
        check(attempt)  # the real tracks: these are no sp2014 runs


def test_a_folder_stands_for_the_logs_at_its_top(attempt, tiny_tracks, tmp_path):
    record = tmp_path / "RECORD"
    logs = copy_logs(attempt, record)
    (record / "README.md").write_text("the write-up\n")
    (record / "notes.txt").write_text("notes beside the logs\n")
    (record / "arm").mkdir()  # a subfolder's logs are another arm's, not this attempt's
    copy_logs(attempt[:1], record / "arm" / "logs")
    assert log_paths([record]) == sorted(logs)
    with pytest.raises(RecordError, match=f"no run logs .* at the top of this folder; these subfolders hold some: "
                                          f"{record / 'arm' / 'logs'}$"):
        log_paths([record / "arm"])
    assert check(log_paths([record]), tiny_tracks)["runs"] == 3
    (tmp_path / "empty").mkdir()
    cli = subprocess.run([sys.executable, "-m", "tools.records", "check", str(tmp_path / "empty")], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert cli.stderr.strip() == f"records: {tmp_path / 'empty'}: no run logs (RUN_ID.txt beside RUN_ID.jsonl) at " \
                                 "the top of this folder"


def run_edit(key, change):
    """An edit of a log's run record: hyperparameter `key` (or a record field, with 'record:')."""
    if key.startswith("record:"):
        return lambda r: {**r, key[7:]: change(r[key[7:]])} if r.get("kind") == "run" else r
    return lambda r: ({**r, "hyperparameters": {**r["hyperparameters"], key: change(r["hyperparameters"][key])}}
                      if r.get("kind") == "run" else r)


@pytest.mark.parametrize("edit, message", [
    (lambda logs: logs[:2] + logs[:1], "the same run as .* \\(same run id\\)"),
    ("copy", "\\(same content\\)"),
    ("copy edited", "\\(same losses\\)"),
    ({1: ("seed", lambda s: 0)}, "got seeds \\[0, 0, 2\\] \\(twice: \\[0\\]\\) \\(missing: \\[1\\]\\)"),
    ({2: ("seed", lambda s: 3)}, "seeds 0..2, each once, .* \\(missing: \\[2\\]\\)"),
    ({1: ("muon_lr", lambda v: 0.1)}, "hyperparameters differ .* --muon_lr \\(0.1 vs"),
    ({1: ("record:clusters_sha256", lambda v: ["0" * 64])}, "sampled its training documents by other clusters"),
    ({1: ("record:world_size", lambda v: 2)}, "ran on 2 rank"),
    ({1: ("record:devices", lambda v: ["NVIDIA H100 80GB HBM3"])}, "ran on 1 rank\\(s\\) of \\['NVIDIA H100"),
    ("stopped", "stopped at step 2 of --max_steps 4; a record run trains every step"),
    ({0: ("val_every", lambda v: 1), 1: ("val_every", lambda v: 1), 2: ("val_every", lambda v: 1)},
     "do not meet track tiny's constants: --val_every is 1, the track's is 2"),
    ("running", "an unfinished log"),
    ("cut", "the run did not finish"),
])
def test_check_refuses_what_is_not_an_attempt(attempt, tiny_tracks, tmp_path, edit, message):
    logs = sorted(copy_logs(attempt, tmp_path / "logs"),  # by seed
                  key=lambda p: json.loads(p.with_suffix(".jsonl").read_text().split("\n")[0])["hyperparameters"]["seed"])
    if callable(edit):
        logs = edit(logs)
    elif isinstance(edit, dict):
        for i, (key, change) in edit.items():
            edit_jsonl(logs[i], run_edit(key, change))
    elif edit.startswith("copy"):
        copy = tmp_path / "logs" / "copy.txt"
        shutil.copy(logs[0], copy)
        shutil.copy(logs[0].with_suffix(".jsonl"), copy.with_suffix(".jsonl"))
        edit_jsonl(copy, run_edit("record:run_id", lambda v: "another id"))
        if edit == "copy edited":
            copy.write_text(copy.read_text() + "\n")
        logs = [logs[0], copy, logs[1], logs[2]]
    elif edit == "stopped":
        edit_jsonl(logs[1], lambda r: {**r, "final_step": 2} if "final_step" in r else r)
    elif edit == "running":
        for suffix in (".txt", ".jsonl"):
            logs[1].with_suffix(suffix).rename(logs[1].with_suffix(".running" + suffix))
        logs[1] = logs[1].with_suffix(".running.txt")
    elif edit == "cut":
        jsonl = logs[1].with_suffix(".jsonl")
        jsonl.write_text("".join(jsonl.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(RecordError, match=message):
        check(logs, tiny_tracks)


def test_check_rejects_other_code_other_data_and_weak_evidence(attempt, tiny_tracks, tmp_path):
    with pytest.raises(RecordError, match="at least 3 runs"):
        check(attempt[:2], tiny_tracks)

    changed = copy_logs(attempt, tmp_path / "code")
    text = changed[1].read_text()
    changed[1].write_text(text.replace("logit_softcap: float = 15.0", "logit_softcap: float = 16.0", 1))
    with pytest.raises(RecordError, match="model.py differs"):
        check(changed, tiny_tracks)
    cli = subprocess.run([sys.executable, "-m", "tools.records", "check", *map(str, changed)], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "records: " in cli.stderr and "model.py differs" in cli.stderr

    other_data = copy_logs(attempt, tmp_path / "data")
    edit_jsonl(other_data[2], run_edit("record:data_sha256", lambda v: "0" * 64))
    with pytest.raises(RecordError, match="other data"):
        check(other_data, tiny_tracks)

    # a target just above the losses: three runs do not show the mean is below it
    losses = [json.loads(line)["valid_loss"] for p in attempt for line in p.with_suffix(".jsonl").read_text().split("\n")
              if "test_loss" in line]
    target = max(losses) + 1e-4
    weak = copy_logs(attempt, tmp_path / "weak")
    for p in weak:
        edit_jsonl(p, run_edit("target_val_loss", lambda v: target))
    weak_tracks = {"tiny": dataclasses.replace(tiny_tracks["tiny"], target=target)}
    with pytest.raises(RecordError, match=f"the mean validation loss .* ± .* of 3 runs is not below the target "
                                          f"{target} with p < 0.01") as weak_error:
        check(weak, weak_tracks)
    rows = weak_error.value.table.splitlines()[2:]  # the runs it weighed, by seed: the user sees what to add
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1", "| 2"]
    assert sorted(row.split(" | ")[1] for row in rows) == sorted(f"{loss:.4f}" for loss in losses)


def test_reproduce_rebuilds_a_run_that_gives_the_same_losses(small_shards, tmp_path, monkeypatch, capsys):
    original = tiny(small_shards, tmp_path, max_steps=4, val_every=2)
    train.main(original)
    (log,) = Path(original.log_dir).glob("*.txt")
    out = tmp_path / "rebuilt"
    cmd = reproduce(log, out, run_it=True)
    assert cmd[:2] == [sys.executable, "train.py"] and f"--data={small_shards}" in cmd
    for name in train.SOURCE_FILES:
        assert (out / name).read_text() == (REPO / name).read_text()
    (first,), (again,) = Path(original.log_dir).glob("*.jsonl"), (out / "logs").glob("*.jsonl")  # its outputs: in out
    assert "--log_dir=logs" in cmd and "--checkpoint_dir=checkpoints" in cmd and list((out / "checkpoints").iterdir())
    losses = lambda path: {r["step"]: r["train_loss"] for r in map(json.loads, path.read_text().splitlines())
                           if "train_loss" in r}
    assert len(losses(first)) == 4 and losses(again) == losses(first)

    # another seed of the attempt, the shards found through another path, relative to where the user is: all else
    # as logged
    (tmp_path / "shards_elsewhere").symlink_to(small_shards)
    monkeypatch.chdir(tmp_path)
    cmd = reproduce(log, tmp_path / "seed1", run_it=True, seed=1, data=Path("shards_elsewhere"))
    assert "--seed=1" in cmd and f"--data={tmp_path / 'shards_elsewhere'}" in cmd and "--seed=0" not in cmd
    (seed1,) = (tmp_path / "seed1" / "logs").glob("*.jsonl")
    meta = lambda path: json.loads(path.read_text().splitlines()[0])["hyperparameters"]
    assert {k for k in meta(first) if meta(seed1)[k] != meta(first)[k]} <= OUTPUT_FLAGS | {"seed"}  # as check sees
    assert meta(seed1)["seed"] == 1 and losses(seed1).keys() == losses(first).keys()
    assert losses(seed1) != losses(first)  # another seed: other weights, data order and masks
    with pytest.raises(RecordError, match="its run has no hyperparameter seeed"):
        command(read_run(log), seeed=1)

    # a log's uploads are its own, a resumed part needs its checkpoint, and relative shards must be found
    (part,) = copy_logs([log], tmp_path / "part")
    edit_jsonl(part, run_edit("record:hyperparameters", lambda h: {**h, "wandb_project": "theirs", "hf_repo": "them/m",
                                                                   "resume": "ckpt/step_000002.pt", "data": "data/x"}))
    cmd = reproduce(part, tmp_path / "part_rebuilt", run_it=False)
    printed = capsys.readouterr().out
    assert "--wandb_project=" in cmd and "--hf_repo=" in cmd and "--resume=ckpt/step_000002.pt" in cmd
    assert "needs that file there" in printed and "--data data/x is not there" in printed
    with pytest.raises(RecordError, match="--data data/x is not there from .*: pass --data PATH"):
        reproduce(part, tmp_path / "part_rebuilt", run_it=True)
    assert set(FRESH_OUTPUTS) <= OUTPUT_FLAGS  # what a rebuilt run changes, check ignores

    # a run cut short (its log unfinished, a last line half written) is rebuilt whole
    cut = tmp_path / "cut" / log.name.replace(".txt", ".running.txt")
    cut.parent.mkdir()
    text = log.read_text()
    cut.write_text(text[:text.rindex("step:")])  # no last step line, no final losses
    lines = log.with_suffix(".jsonl").read_text().splitlines(keepends=True)
    cut.with_suffix(".jsonl").write_text("".join(lines[:3]) + lines[3][:10])
    with pytest.raises(RecordError, match="an unfinished log"):
        read_run(cut)
    assert reproduce(cut, tmp_path / "cut_rebuilt", run_it=False) == reproduce(log, tmp_path / "whole", run_it=False)
    for name in train.SOURCE_FILES:
        assert (tmp_path / "cut_rebuilt" / name).read_text() == (REPO / name).read_text()


@pytest.mark.parametrize("command", ["reproduce", "check"])  # its output; a refusal (no track has these runs)
def test_a_reader_that_stops_early_gets_no_traceback(attempt, tmp_path, command):
    """`reproduce LOG --out DIR | head -1` or `check ... | head -1`: when the reader is gone before the output
    comes, the work is done and the command ends with status 1, its refusal on stderr and no traceback."""
    args = [str(attempt[0]), "--out", str(tmp_path / "rebuilt")] if command == "reproduce" else map(str, attempt)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as a pipe has it
    proc = subprocess.Popen([sys.executable, "-m", "tools.records", command, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before it prints: Python starts and imports first
    err = proc.stderr.read()
    assert proc.wait() == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
    if command == "reproduce":
        assert (tmp_path / "rebuilt" / "train.py").is_file()
    else:
        assert err.startswith("records: no track of data/tracks.py has these runs' data"), err


def test_leaderboard_is_made_from_the_logs(attempt, tiny_tracks, tmp_path):
    logs = tmp_path / "logs_to_keep"
    logs.mkdir()
    copy_logs(attempt, logs / "2026-01-01_tiny")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Records\n\n{BOARD_START}\nold table\n{BOARD_END}\n\nmore text\n")
    with pytest.raises(RecordError, match="2026-01-01_tiny passes check but has no write-up"):
        leaderboard(logs, readme, tiny_tracks)
    (logs / "2026-01-01_tiny" / "README.md").write_text("# tiny\n")
    (logs / "2026-01-01_tiny" / "kernels.txt").write_text("a table the write-up cites\n")  # no .jsonl: not a log
    table = leaderboard(logs, readme, tiny_tracks)
    rows = table.splitlines()[2:]
    assert len(rows) == 1 and "old table" not in readme.read_text() and readme.read_text().endswith("more text\n")
    assert rows[0].startswith("| tiny |") and "| 3 (p = " in rows[0] and "| tiny | 1x cpu |" in rows[0]
    assert "[2026-01-01_tiny](logs_to_keep/2026-01-01_tiny/README.md)" in rows[0]
    assert leaderboard(logs, readme, tiny_tracks) == table  # regenerating changes nothing

    no_target = copy_logs(attempt[:2], logs / "sweep")  # runs without a target are no attempt: left out,
    for log in no_target:  # even one that never finished (a long run's part before a --resume)
        edit_jsonl(log, run_edit("target_val_loss", lambda v: 0.0))
    jsonl = min(no_target).with_suffix(".jsonl")  # the folder's first log
    jsonl.write_text(jsonl.read_text().splitlines(keepends=True)[0])
    assert leaderboard(logs, readme, tiny_tracks) == table
    copy_logs(attempt, logs / "measurements" / "call1")  # logs in subfolders only: a write-up, not an attempt
    assert leaderboard(logs, readme, tiny_tracks) == table
    twinless = copy_logs(attempt[:1], logs / "twinless")[0]  # but a log whose .jsonl is lost is not overlooked
    twinless.with_suffix(".jsonl").unlink()
    with pytest.raises(RecordError, match="jsonl twin"):
        leaderboard(logs, readme, tiny_tracks)
    shutil.rmtree(logs / "twinless")

    killed = copy_logs(attempt[:1], logs / "killed")  # a run killed before its run record was written
    killed[0].with_suffix(".jsonl").write_text("")
    with pytest.raises(RecordError, match="no run record"):
        leaderboard(logs, readme, tiny_tracks)
    shutil.rmtree(logs / "killed")

    copy_logs(attempt[:2], logs / "too_few")  # an attempt that fails today's rules is listed apart, with why
    table = leaderboard(logs, readme, tiny_tracks)
    assert table.splitlines()[2] == rows[0]
    assert "- [too_few](logs_to_keep/too_few): an attempt needs at least 3 runs for the t-test, got 2" in table


def test_the_readme_leaderboard_and_the_record_commands_are_those_of_the_kept_logs(small_shards, tmp_path):
    """README.md's table is what `leaderboard` makes of logs_to_keep/, and each track's record command (what
    `TRACK=... bash run.sh` reads from data/tracks.py) is that of its fastest record: the same hyperparameters but
    the seed, the outputs, the batch split (run.sh's, for the GPU count) and flags that the record's train.py did
    not have yet."""
    (tmp_path / "logs_to_keep").symlink_to(REPO / "logs_to_keep")
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    table = leaderboard(tmp_path / "logs_to_keep", readme)
    assert readme.read_text() == (REPO / "README.md").read_text(), "run python -m tools.records leaderboard"
    fastest = {}
    for track, folder in re.findall(r"^\| (\S+) \| .*\[([^]]+)\]\(logs_to_keep/", table, re.M):
        fastest.setdefault(track, folder)  # the rows are by track, fastest first
    assert fastest.keys() >= {"sp2014", "sp2014-long"}
    ignored = OUTPUT_FLAGS | {"seed", "tokens_per_rank", "grad_accum"}
    for name, folder in fastest.items():
        logged = read_run(folder_logs(REPO / "logs_to_keep" / folder)[0])["meta"]["hyperparameters"]
        record = train.parse_args(shlex.split(TRACKS[name].record) + ["--data", str(small_shards)])
        differ = {k: (logged[k], v) for k, v in dataclasses.asdict(record).items()
                  if k in logged and k not in ignored and logged[k] != v}
        assert not differ, f"track {name}'s record command differs from {folder}'s runs (logged, command): {differ}"


def test_plot_draws_the_runs_into_a_png_of_the_requested_size(attempt, tmp_path):
    out = tmp_path / "runs.png"
    cli = subprocess.run([sys.executable, "-m", "tools.records", "plot", *map(str, attempt), "--out", str(out),
                          "--size", "1234x567"], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1234, 567)
    assert len(png) > 20_000  # two panels of lines and text, not a blank canvas

    part = copy_logs(attempt[:1], tmp_path / "part")[0]  # a run's part before a --resume: no final lines
    lines = part.with_suffix(".jsonl").read_text().splitlines(keepends=True)
    part.with_suffix(".jsonl").write_text("".join(r for r in lines if "test_loss" not in r and "target_reached" not in r)
                                          + lines[-1][:10])  # and a line being written
    plot([part, attempt[1]], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_labels_name_what_the_runs_differ_in(attempt, tmp_path):
    runs = [(p, [], run_record(p)) for p in copy_logs(attempt, tmp_path / "runs")]
    runs[2][2]["hyperparameters"]["mask_rate"] = 0.25  # the lever of an A/B
    runs[2][2]["hyperparameters"]["log_dir"] = "elsewhere"  # where a run was kept is no lever
    assert labels(runs) == [f"tiny 4 steps mask_rate={rate} seed={meta['hyperparameters']['seed']} {p.stem[:8]}"
                            for (p, _, meta), rate in zip(runs, (0.15, 0.15, 0.25))]
    del runs[0][2]["hyperparameters"]["sample_by_cluster"]  # a log from before the flag: it ran at the default
    runs[1][2]["hyperparameters"]["sample_by_cluster"] = True
    assert [label.split()[4] for label in labels(runs)] == ["sample_by_cluster=False", "sample_by_cluster=True",
                                                            "sample_by_cluster=False"]
    assert labels(runs[:1]) == [f"tiny 4 steps {runs[0][0].stem[:8]}"]  # one run: nothing to tell apart
    runs[0][2]["hyperparameters"]["removed_flag"] = 1  # a log of a flag that train.py no longer has
    assert [label.split()[4] for label in labels(runs)] == ["removed_flag=1", "removed_flag=None", "removed_flag=None"]
    del runs[0][2]["hyperparameters"]["removed_flag"]
    lever = runs[1][0]  # a lever in code: its log embeds another optimizer.py
    lever.write_text(lever.read_text().replace("==> optimizer.py <==\n", "==> optimizer.py <==\n# a lever\n", 1))
    digest = {p: hashlib.sha256(read_run(p)["sources"]["optimizer.py"].encode()).hexdigest()[:6] for p, _, _ in runs}
    assert digest[runs[0][0]] == digest[runs[2][0]] != digest[lever]
    assert [label.split()[-2] for label in labels(runs)] == [f"optimizer.py@{digest[p]}" for p, _, _ in runs]
    newer = runs[2][0]  # a log from after a source file was added: the others have none of it
    header = "==> optimizer.py <==\n"
    newer.write_text(newer.read_text().replace(header, "==> schedule.py <==\n\n" + header, 1))  # an empty file
    empty = hashlib.sha256(b"").hexdigest()[:6]
    assert [label.split()[-2] for label in labels(runs)] == ["schedule.py@none"] * 2 + [f"schedule.py@{empty}"]
    newer.write_text(newer.read_text().replace("==> model.py <==\n", "==> model.py <==\n# newer\n", 1))
    code = [label.split()[-2] for label in labels(runs + runs[:1])]  # three files differ: one digest a version
    assert len(set(code[:3])) == 3 and code[3] == code[0]  # the first run twice: one code, one digest
    assert all(c.startswith("sources@") for c in code) and not any(".py@" in label for label in labels(runs))


def test_plot_rejects_what_is_not_a_log(attempt, tmp_path):
    with pytest.raises(RecordError, match="its .jsonl twin"):
        plot([REPO / "README.md"], tmp_path / "x.png")
    stray = tmp_path / "notes.txt"
    stray.write_text("just notes\n")
    stray.with_suffix(".jsonl").write_text("{}\n")
    cli = subprocess.run([sys.executable, "-m", "tools.records", "plot", str(attempt[0]), str(stray), "--out",
                          str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 1 and "is it a log written by train.py?" in cli.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.fixture(scope="module")
def variant(small_shards, tmp_path_factory) -> dict[int, Path]:
    """The attempt's three seeds with one lever changed, a 25% training mask rate: the variant arm of an A/B."""
    logs = tmp_path_factory.mktemp("variant")
    for seed in range(3):
        train.main(tiny(small_shards, tmp_path_factory.mktemp(f"variant{seed}"), seed=seed, max_steps=4, val_every=2,
                        target_val_loss=4.0, mask_rate=0.25, log_dir=str(logs)))
    return by_seed(logs.glob("*.txt"))


def by_seed(logs) -> dict[int, Path]:
    return {run_record(p)["hyperparameters"]["seed"]: p for p in logs}


def final_loss(log: Path, split: str) -> float:
    return next(json.loads(line)[f"{split}_loss"] for line in log.with_suffix(".jsonl").read_text().splitlines()
                if "test_loss" in line)


def test_compare_pairs_the_arms_by_seed(attempt, variant):
    baseline = by_seed(attempt)
    result = compare(attempt, list(variant.values())[::-1])  # in any order: the pairs are made by seed
    assert result["seeds"] == [0, 1, 2]
    for split in ("valid", "test"):
        d = [final_loss(variant[s], split) - final_loss(baseline[s], split) for s in range(3)]
        mean, std = statistics.mean(d), statistics.stdev(d)
        assert result[split]["difference_mean"] == pytest.approx(mean)
        assert result[split]["difference_std"] == pytest.approx(std)
        assert result[split]["p_value"] == pytest.approx(t_sf(-mean / (std / 3 ** 0.5), 2))
    rows = [row.split(" | ") for row in result["table"].splitlines()[2:]]
    assert [row[0] for row in rows] == ["| 0", "| 1", "| 2"]
    assert [row[1:3] for row in rows] == [[f"{final_loss(log[s], 'valid'):.4f}" for log in (baseline, variant)]
                                          for s in range(3)]
    assert "the variant differs in --mask_rate 0.15 -> 0.25\n" in result["summary"]
    step_ms = lambda log: (lambda o: o["train_time_ms"] / o["final_step"])(read_run(log)["outcome"])
    assert result["step_ms"]["variant"] == pytest.approx(statistics.mean(map(step_ms, variant.values())))
    assert result["step_ratio"] == pytest.approx(statistics.mean(step_ms(variant[s]) / step_ms(baseline[s])
                                                                 for s in range(3)))
    assert [row[-2:] for row in rows] == [[f"{step_ms(baseline[s]):.2f}", f"{step_ms(variant[s]):.2f} |"]
                                          for s in range(3)]
    swapped = compare(list(variant.values()), attempt)  # the other way round: the same evidence, the other sign
    assert swapped["valid"]["difference_mean"] == pytest.approx(-result["valid"]["difference_mean"])
    assert swapped["valid"]["p_value"] == pytest.approx(1 - result["valid"]["p_value"])
    assert swapped["step_ms"] == {"baseline": result["step_ms"]["variant"], "variant": result["step_ms"]["baseline"]}


def test_compare_weighs_a_lever_of_speed_alone(attempt, tmp_path):
    """Training repeats to the bit: a change that makes the step faster and nothing else gives the same losses. Its
    arms are not duplicates; their losses differ by nothing."""
    faster = copy_logs(attempt, tmp_path / "faster")
    for log in faster:
        log.write_text(log.read_text().replace("==> train.py <==\n", "==> train.py <==\n# a faster step\n", 1))
        edit_jsonl(log, run_edit("record:run_id", lambda v: v + "-faster"))
    result = compare(attempt, faster)
    assert result["valid"] == {"difference_mean": 0.0, "difference_std": 0.0, "p_value": 1.0}
    assert result["step_ratio"] == pytest.approx(1.0) and "the variant differs in train.py\n" in result["summary"]
    stopped = copy_logs(faster[:1], tmp_path / "stopped")[0]
    edit_jsonl(stopped, lambda r: {**r, "final_step": 2} if "final_step" in r else r)
    with pytest.raises(RecordError, match="stopped at step 2 of --max_steps 4"):
        compare(attempt, [stopped, *faster[1:]])  # its final loss is not that of the end of its schedule


def test_compare_refuses_what_does_not_pair(attempt, variant, tmp_path):
    baseline = by_seed(attempt)
    with pytest.raises(RecordError, match="the same run as .* a log counts once"):
        compare(attempt, attempt)  # an A/A of the same logs is no evidence
    with pytest.raises(RecordError, match=r"the arms have other seeds: baseline \[0, 1, 2\], variant \[0, 1\]; run "
                                          "the seeds that one arm lacks"):
        compare(attempt, [variant[0], variant[1]])
    with pytest.raises(RecordError, match="at least 2 pairs"):
        compare([baseline[0]], [variant[0]])
    with pytest.raises(RecordError, match=r"--mask_rate \(0.25 vs 0.15\); the baseline arm changes nothing but"):
        compare([baseline[0], baseline[1], variant[2]], [variant[0], variant[1]])
    rerun = copy_logs([variant[0]], tmp_path / "rerun")[0]  # seed 0 of the baseline again, with other losses
    edit_jsonl(rerun, run_edit("mask_rate", lambda v: 0.15))
    with pytest.raises(RecordError, match=f"the baseline arm has seed 0 twice \\({re.escape(str(baseline[0]))} and "
                                          f"{re.escape(str(rerun))}\\); an A/B pairs its runs by seed: keep one"):
        compare(attempt + [rerun], [variant[1], variant[2]])
    other = copy_logs(list(variant.values()), tmp_path / "other")
    for log in other:
        edit_jsonl(log, run_edit("record:data_sha256", lambda v: "0" * 64))
    with pytest.raises(RecordError, match="trained on other data .* their validation losses do not compare"):
        compare(attempt, other)

    def cli(*variant_logs):
        return subprocess.run([sys.executable, "-m", "tools.records", "compare", "--baseline", *map(str, attempt),
                               "--variant", *map(str, variant_logs)], cwd=REPO, capture_output=True, text=True)
    shown = cli(*variant.values())
    assert shown.returncode == 0 and shown.stdout.startswith("| seed | baseline val |")
    assert "valid loss, variant - baseline over 3 seeds" in shown.stdout
    refused = cli(variant[0], variant[1])
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("records: an A/B pairs its runs by seed")
