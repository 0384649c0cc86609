"""tools/scaling.py: the fitter on points of a known law, the recommendation against the law's optimum, real logs."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train
from model import PRESETS, Model
from test_train import REPO, tiny
from tools.records import RecordError
from tools.scaling import PAPER_MLM, ScalingError, fit, main, optimum, points, predict, recommend

LAW = {"E": 1.8, "A": 400.0, "alpha": 0.34, "B": 410.0, "beta": 0.28}


def grid_of_runs(law, noise, seed=0):
    """36 runs: 6 model sizes x 6 token counts, their losses from the law times log-normal noise."""
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6)))
    return n, d, predict(law, n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.size))


def scaling_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.scaling", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True)


def test_fit_recovers_a_known_law_from_noisy_points():
    law = fit(*grid_of_runs(LAW, noise=1e-3))
    assert law["alpha"] == pytest.approx(LAW["alpha"], abs=0.02)
    assert law["beta"] == pytest.approx(LAW["beta"], abs=0.02)
    assert law["E"] == pytest.approx(LAW["E"], rel=0.02)
    assert law["A"] == pytest.approx(LAW["A"], rel=0.3) and law["B"] == pytest.approx(LAW["B"], rel=0.3)


def test_the_recommendation_is_the_laws_optimum_for_the_budget():
    flops = 1e21
    n, d = optimum(LAW, flops)
    a, b = LAW["alpha"], LAW["beta"]
    g = (a * LAW["A"] / (b * LAW["B"])) ** (1 / (a + b))
    assert n == pytest.approx(g * (flops / 6) ** (b / (a + b)), rel=1e-12)
    assert 6 * n * d == pytest.approx(flops, rel=1e-12)
    sizes = np.geomspace(n / 10, n * 10, 20001)  # no size on the budget's curve does better
    assert sizes[np.argmin(predict(LAW, sizes, flops / (6 * sizes)))] == pytest.approx(n, rel=1e-3)

    anchor = 1e18
    r = recommend(LAW, anchor, flops)
    assert (r["params"], r["tokens"]) == (n, d)
    assert r["paper_params"] == pytest.approx(optimum(LAW, anchor)[0] * 1000 ** PAPER_MLM["n_exponent"])
    assert r["params_ratio"] == pytest.approx(n / r["paper_params"])
    assert r["n_exponent"] == pytest.approx(b / (a + b))


def test_recommend_takes_a_fit_and_a_gpu_budget(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps({"law": LAW, "anchor_flops": 1e18, "runs": []}))
    result = main(["recommend", "--fit", str(path), "--gpu_hours", "2", "--tokens_per_sec", "1e5", "--preset",
                   "tiny", "--gpu", "H100"])
    flops = 6 * Model(PRESETS["tiny"]).num_params() * 1e5 * 2 * 3600
    assert result["flops"] == pytest.approx(flops) and (result["params"], result["tokens"]) == optimum(LAW, flops)
    out = capsys.readouterr().out
    assert f"{flops:.3g} FLOPs" in out and "on H100" in out and "Cheng et al." in out
    for incomplete in (["--gpu_hours", "2"], []):  # which GPU and what throughput; no budget at all
        with pytest.raises(SystemExit):
            main(["recommend", "--fit", str(path), *incomplete])
    missing = scaling_cli("recommend", "--fit", tmp_path / "none.json", "--flops", 1e20)
    assert missing.returncode == 1 and "python -m tools.scaling fit" in missing.stderr


def test_fit_refuses_too_few_runs_or_one_model_size():
    n, d, loss = grid_of_runs(LAW, noise=0)
    diagonal = [0, 7, 14, 21, 28]  # five sizes, five token counts
    with pytest.raises(ScalingError, match="at least 6 runs, got 5"):
        fit(n[diagonal], d[diagonal], loss[diagonal])
    one_size = n == n[0]
    with pytest.raises(ScalingError, match="1 model size"):
        fit(n[one_size], d[one_size], loss[one_size])


@pytest.fixture(scope="module")
def tiny_logs(small_shards, tmp_path_factory) -> list[Path]:
    logs = tmp_path_factory.mktemp("scaling_logs")
    for steps in (2, 4):
        train.main(tiny(small_shards, tmp_path_factory.mktemp(f"steps{steps}"), max_steps=steps, val_every=0,
                        log_dir=str(logs)))
    return sorted(logs.glob("*.txt"))


def test_fit_reads_real_logs(tiny_logs, tmp_path):
    rows = sorted(points(tiny_logs), key=lambda r: r["tokens"])
    assert [r["params"] for r in rows] == [Model(PRESETS["tiny"]).num_params()] * 2  # counted without weights
    assert [r["tokens"] for r in rows] == [2 * 1024, 4 * 1024]
    for row in rows:
        final = [json.loads(line) for line in Path(row["log"]).with_suffix(".jsonl").read_text().splitlines()
                 if "test_loss" in line]
        assert row["loss"] == final[0]["valid_loss"]
    # one preset is all a CPU test can afford to train: the law's model-size term cannot be fitted from it
    r = scaling_cli("fit", *tiny_logs, "--out", tmp_path / "fit.json")
    assert r.returncode == 1 and "1 model size(s)" in r.stderr and not (tmp_path / "fit.json").exists()


def test_a_log_without_a_final_loss_is_refused(tiny_logs, tmp_path):
    txt = tmp_path / tiny_logs[0].name
    txt.write_text(tiny_logs[0].read_text())
    jsonl = tiny_logs[0].with_suffix(".jsonl").read_text().splitlines()
    txt.with_suffix(".jsonl").write_text("".join(line + "\n" for line in jsonl if "test_loss" not in line))
    with pytest.raises(RecordError, match="did not finish"):
        points([txt])
    running = txt.with_name(txt.stem + ".running.txt")  # a run in progress, which logs/*.txt matches too
    for suffix in (".txt", ".jsonl"):
        shutil.copy(txt.with_suffix(suffix), running.with_suffix("").with_suffix(".running" + suffix))
    assert points([running, *tiny_logs]) == points(tiny_logs)
    r = scaling_cli("fit", running, *tiny_logs, "--out", tmp_path / "fit.json")
    assert f"left out 1 unfinished log(s): {running}\n" in r.stderr and "1 model size(s)" in r.stderr
    r = scaling_cli("fit", txt, "--out", tmp_path / "fit.json")
    assert r.returncode == 1 and "scaling: " in r.stderr and "did not finish" in r.stderr
