"""tools/records.py on real tiny CPU runs: checking an attempt, rebuilding a run from its log, the leaderboard, plots."""
import json
import struct
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train
from test_train import REPO, tiny
from tools.records import BOARD_END, BOARD_START, RecordError, check, leaderboard, plot, reproduce, t_sf


@pytest.fixture(scope="module")
def attempt(small_shards, tmp_path_factory) -> list[Path]:
    """Three runs of one attempt (seeds 0, 1, 2) that reach a loose target at their first evaluation."""
    logs = tmp_path_factory.mktemp("logs_to_keep")
    for seed in range(3):
        train.main(tiny(small_shards, tmp_path_factory.mktemp(f"run{seed}"), seed=seed, max_steps=4, val_every=2,
                        target_val_loss=4.0, log_dir=str(logs)))
    return sorted(logs.glob("*.txt"))


def copy_logs(paths, folder: Path) -> list[Path]:
    folder.mkdir()
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


def test_check_accepts_an_attempt(attempt):
    result = check(attempt)
    assert result["runs"] == 3 and result["p_value"] < 0.01 and result["val_loss_mean"] < 4.0


def test_check_rejects_other_code_other_data_missed_targets_and_weak_evidence(attempt, tmp_path):
    with pytest.raises(RecordError, match="at least 3 runs"):
        check(attempt[:2])

    changed = copy_logs(attempt, tmp_path / "code")
    text = changed[1].read_text()
    changed[1].write_text(text.replace("logit_softcap: float = 15.0", "logit_softcap: float = 16.0", 1))
    with pytest.raises(RecordError, match="model.py differs"):
        check(changed)
    cli = subprocess.run([sys.executable, "-m", "tools.records", "check", *map(str, changed)], cwd=REPO,
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "records: " in cli.stderr and "model.py differs" in cli.stderr

    other_data = copy_logs(attempt, tmp_path / "data")
    edit_jsonl(other_data[2], lambda r: {**r, "data_sha256": "0" * 64} if r.get("kind") == "run" else r)
    with pytest.raises(RecordError, match="other data"):
        check(other_data)

    missed = copy_logs(attempt, tmp_path / "missed")
    edit_jsonl(missed[0], lambda r: {**r, "target_reached": False} if "target_reached" in r else r)
    with pytest.raises(RecordError, match="did not reach"):
        check(missed)

    # a target just above the losses: the runs reached it, but three of them do not show the mean is below it
    losses = [json.loads(line)["valid_loss"] for p in attempt for line in p.with_suffix(".jsonl").read_text().split("\n")
              if "test_loss" in line]
    weak = copy_logs(attempt, tmp_path / "weak")
    target = max(losses) + 1e-4
    for p in weak:
        edit_jsonl(p, lambda r: {**r, "hyperparameters": {**r["hyperparameters"], "target_val_loss": target}}
                   if r.get("kind") == "run" else r)
    with pytest.raises(RecordError, match="p < 0.01"):
        check(weak)


def test_reproduce_rebuilds_a_run_that_gives_the_same_losses(small_shards, tmp_path):
    original = tiny(small_shards, tmp_path, max_steps=4, val_every=2)
    train.main(original)
    (log,) = Path(original.log_dir).glob("*.txt")
    out = tmp_path / "rebuilt"
    cmd = reproduce(log, out, run_it=True)
    assert cmd[:2] == [sys.executable, "train.py"] and f"--data={small_shards}" in cmd
    for name in train.SOURCE_FILES:
        assert (out / name).read_text() == (REPO / name).read_text()
    first, again = sorted(Path(original.log_dir).glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    losses = lambda path: {r["step"]: r["train_loss"] for r in map(json.loads, path.read_text().splitlines())
                           if "train_loss" in r}
    assert len(losses(first)) == 4 and losses(again) == losses(first)


def test_leaderboard_is_made_from_the_logs(attempt, tmp_path):
    logs = tmp_path / "logs_to_keep"
    logs.mkdir()
    copy_logs(attempt, logs / "2026-01-01_tiny")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Records\n\n{BOARD_START}\nold table\n{BOARD_END}\n\nmore text\n")
    table = leaderboard(logs, readme)
    rows = table.splitlines()[2:]
    assert len(rows) == 1 and "old table" not in readme.read_text() and readme.read_text().endswith("more text\n")
    assert "| 3 (p = " in rows[0] and "| tiny | 1x none |" in rows[0]  # no GPU in these logs
    assert "[2026-01-01_tiny](logs_to_keep/2026-01-01_tiny)" in rows[0]
    assert leaderboard(logs, readme) == table  # regenerating changes nothing

    no_target = copy_logs(attempt[:2], logs / "sweep")  # runs without a target are no attempt: left out,
    for log in no_target:  # even one that never finished (a long run's part before a --resume)
        edit_jsonl(log, lambda r: {**r, "hyperparameters": {**r["hyperparameters"], "target_val_loss": 0.0}}
                   if r.get("kind") == "run" else r)
    jsonl = min(no_target).with_suffix(".jsonl")  # the folder's first log
    jsonl.write_text(jsonl.read_text().splitlines(keepends=True)[0])
    assert leaderboard(logs, readme) == table

    killed = copy_logs(attempt[:1], logs / "killed")  # a run killed before its run record was written
    killed[0].with_suffix(".jsonl").write_text("")
    with pytest.raises(RecordError, match="no run record"):
        leaderboard(logs, readme)
    shutil.rmtree(logs / "killed")

    copy_logs(attempt[:2], logs / "too_few")  # a folder that is not a record stops the table, saying why
    with pytest.raises(RecordError, match="too_few is not a record: an attempt needs at least 3 runs"):
        leaderboard(logs, readme)


def test_plot_draws_the_runs_into_a_png_of_the_requested_size(attempt, tmp_path):
    out = tmp_path / "runs.png"
    cli = subprocess.run([sys.executable, "-m", "tools.records", "plot", *map(str, attempt), "--out", str(out),
                          "--size", "1234x567"], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1234, 567)
    assert len(png) > 20_000  # two panels of lines and text, not a blank canvas


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
