"""Compute-optimal sizing: fit L(N, D) = E + A/N^alpha + B/D^beta to our runs, then size a model for a budget.

    python -m tools.scaling fit logs/*.txt --out fit.json [--plot fit.png]
    python -m tools.scaling recommend --fit fit.json --flops 1e19
    python -m tools.scaling recommend --fit fit.json --gpu_hours 8 --tokens_per_sec 363894 --preset speedrun --gpu H100

N is a run's parameter count (its preset's, embeddings included), D its training tokens, L its final validation
loss. The law's form is that of Cheng et al., "Training Compute-Optimal Protein Language Models" (NeurIPS 2024,
arXiv:2411.02142). For a budget of C FLOPs (C = 6 N D) its optimum is N = G (C/6)^(beta/(alpha+beta)),
D = (C/6)^(alpha/(alpha+beta)) / G with G = (alpha A / (beta B))^(1/(alpha+beta)).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from model import PRESETS, Model
from tools.records import RecordError, read_run, tokens_trained, unfinished

# Cheng et al.'s masked-LM compute-optimal exponents, N_opt ∝ C^0.776 and D_opt ∝ C^0.230 (their IsoFLOPs fit),
# as collected in a public notes file of published scaling exponents ("Training Compute-Optimal Protein Language
# Models ... MLM: a=0.776, b=0.230") and matching a public summary of the paper: 10x the compute means ~6x the MLM
# model and ~70% more data. Their prefactors and their L(N, D) coefficients (E, A, alpha, B, beta) were not found,
# so the paper alone cannot size a model: we compare its exponents with our fit's, anchored at our own runs.
PAPER_MLM = {"n_exponent": 0.776, "d_exponent": 0.230}
DISAGREE = 2.0  # sizes more than 2x apart at the budget are reported as a disagreement with the paper
HUBER_DELTA = 1e-3  # on log-loss residuals, as Hoffmann et al. (Chinchilla) fitted their law


class ScalingError(Exception):
    pass


def params(preset: str) -> int:
    """The preset's parameter count, counted on the meta device so that no weights are allocated."""
    if preset not in PRESETS:
        raise ScalingError(f"preset {preset!r} is not in model.PRESETS ({', '.join(PRESETS)})")
    with torch.device("meta"):
        return Model(PRESETS[preset]).num_params()


def points(paths: list) -> list[dict]:
    """(N, D, final validation loss) of each finished log. The unfinished ones that train.py names RUN_ID.running.txt
    (a run in progress) and RUN_ID.failed.txt are left out with a note: `logs/*.txt` matches them too."""
    left_out = [p for p in paths if unfinished(p)]
    if left_out:
        print(f"left out {len(left_out)} unfinished log(s): {', '.join(map(str, left_out))}", file=sys.stderr)
    rows = []
    for path in (p for p in paths if not unfinished(p)):
        run = read_run(path)  # says what is wrong with a log that is not one, or a run that did not finish
        rows.append({"log": str(path), "params": params(run["meta"]["hyperparameters"]["preset"]),
                     "tokens": tokens_trained(run), "loss": run["final"]["valid_loss"]})
    return rows


def predict(law: dict, n, d):
    return law["E"] + law["A"] / np.power(n, law["alpha"]) + law["B"] / np.power(d, law["beta"])


def fit(n, d, loss) -> dict:
    """E, A, alpha, B, beta minimising the Huber loss of log-loss residuals, refined by L-BFGS from the best points
    of a grid over (alpha, beta)."""
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if len(set(n)) < 2 or len(set(d)) < 2:
        raise ScalingError(f"the runs cover {len(set(n))} model size(s) and {len(set(d))} token count(s); the law "
                           "needs at least 2 of each (train other presets and other --max_steps)")
    if len(loss) < 6:
        raise ScalingError(f"the law has 5 parameters; fitting it needs at least 6 runs, got {len(loss)}. "
                           "Add runs of other model sizes and lengths")
    if not np.all(loss > 0):
        raise ScalingError("every final validation loss must be positive")
    # For fixed exponents the law is linear in E, A, B: least squares on relative residuals (close to log-loss
    # residuals) gives them at once for every grid point, so the grid costs no iterative fitting.
    exponents = np.linspace(0.02, 2.0, 100)
    alpha, beta = (g.ravel() for g in np.meshgrid(exponents, exponents, indexing="ij"))
    terms = np.stack([np.ones((len(alpha), len(n))), n ** -alpha[:, None], d ** -beta[:, None]], -1) / loss[:, None]
    scale = np.linalg.norm(terms, axis=1, keepdims=True)  # the columns differ by orders of magnitude
    coef = np.linalg.pinv(terms / scale) @ np.ones(len(n)) / scale[:, 0]
    coef = np.maximum(coef, 1e-12)  # the law's terms are positive; a clipped start is refined below anyway
    residual = np.log(np.einsum("gpk,gk->gp", terms, coef))
    starts = np.argsort(huber(torch.from_numpy(residual)).sum(1).numpy())[:8]
    best = None
    for g in starts:
        law, objective = refine(n, d, loss, coef[g], alpha[g], beta[g])
        if best is None or objective < best[1]:
            best = law, objective
    return best[0]


def huber(r: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.huber_loss(r, torch.zeros_like(r), delta=HUBER_DELTA, reduction="none")


def refine(n, d, loss, coef, alpha, beta) -> tuple[dict, float]:
    """L-BFGS on log E, log A, log B, alpha, beta (positive terms by construction), in float64 on the CPU."""
    e, a, b = np.log(coef)
    x = torch.tensor([e, a, alpha, b, beta], dtype=torch.float64, requires_grad=True)
    log_n, log_d, log_loss = (torch.tensor(np.log(v)) for v in (n, d, loss))

    def objective():
        terms = torch.stack([x[0].expand_as(log_n), x[1] - x[2] * log_n, x[3] - x[4] * log_d])
        r = torch.logsumexp(terms, 0) - log_loss
        return huber(r).sum()

    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    opt.step(closure)
    e, a, alpha, b, beta = x.tolist()
    law = {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta}
    value = objective().item()
    return law, value if math.isfinite(value) and alpha > 0 and beta > 0 else math.inf


def law_text(law: dict) -> str:
    return f"L = {law['E']:.4f} + {law['A']:.4g}/N^{law['alpha']:.4f} + {law['B']:.4g}/D^{law['beta']:.4f}"


def optimum(law: dict, flops: float) -> tuple[float, float]:
    """The compute-optimal N and D for C = 6 N D FLOPs under the law."""
    alpha, beta = law["alpha"], law["beta"]
    g = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
    return g * (flops / 6) ** (beta / (alpha + beta)), (flops / 6) ** (alpha / (alpha + beta)) / g


def recommend(law: dict, anchor_flops: float, flops: float) -> dict:
    """Our optimum at the budget, and the paper's: its exponents carried from our optimum at anchor_flops (the
    largest compute among our runs) to the budget, since its prefactors are missing."""
    n, d = optimum(law, flops)
    n0, d0 = optimum(law, anchor_flops)
    growth = flops / anchor_flops
    paper_n, paper_d = n0 * growth ** PAPER_MLM["n_exponent"], d0 * growth ** PAPER_MLM["d_exponent"]
    return {"flops": flops, "params": n, "tokens": d, "paper_params": paper_n, "paper_tokens": paper_d,
            "params_ratio": n / paper_n, "tokens_ratio": d / paper_d,
            "n_exponent": law["beta"] / (law["alpha"] + law["beta"]),
            "d_exponent": law["alpha"] / (law["alpha"] + law["beta"])}


def report(r: dict) -> str:
    lines = [f"budget {r['flops']:.3g} FLOPs: {r['params'] / 1e6:,.1f}M parameters on {r['tokens'] / 1e9:,.3g}B "
             f"tokens (our fit: N ∝ C^{r['n_exponent']:.3f}, D ∝ C^{r['d_exponent']:.3f})",
             f"Cheng et al. MLM exponents (N ∝ C^{PAPER_MLM['n_exponent']}, D ∝ C^{PAPER_MLM['d_exponent']}) from "
             f"our optimum at our largest run's compute: {r['paper_params'] / 1e6:,.1f}M parameters on "
             f"{r['paper_tokens'] / 1e9:,.3g}B tokens; ours is {r['params_ratio']:.2f}x the size and "
             f"{r['tokens_ratio']:.2f}x the tokens"]
    if not 1 / DISAGREE <= r["params_ratio"] <= DISAGREE:
        lines.append(f"our fit DISAGREES with the paper by more than {DISAGREE:g}x in model size at this budget: "
                     "trust neither far from the compute our runs covered; add runs nearer the budget")
    return "\n".join(lines)


def plot(rows: list[dict], law: dict, out: Path):
    """Loss against tokens, one colour per model size, with the fitted law's curve for each."""
    import matplotlib  # only here: nothing else needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    tokens = np.array([r["tokens"] for r in rows], dtype=np.float64)
    grid = np.geomspace(tokens.min() / 2, tokens.max() * 2, 100)
    for i, n in enumerate(sorted({r["params"] for r in rows})):
        mine = [r for r in rows if r["params"] == n]
        colour = f"C{i}"
        ax.scatter([r["tokens"] for r in mine], [r["loss"] for r in mine], color=colour, label=f"{n / 1e6:.2f}M")
        ax.plot(grid, predict(law, n, grid), color=colour)
    ax.set(xscale="log", xlabel="training tokens", ylabel="final validation loss",
           title=law_text(law))
    ax.grid(alpha=0.3)
    ax.legend(title="parameters")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit the law to run logs")
    f.add_argument("logs", nargs="+", type=Path)
    f.add_argument("--out", type=Path, required=True, help="the JSON to write the fit and its points to")
    f.add_argument("--plot", type=Path, help="also draw loss against tokens with the fitted curves into this PNG")
    r = sub.add_parser("recommend", help="compute-optimal model size and tokens for a budget")
    r.add_argument("--fit", type=Path, required=True, help="a JSON written by the fit subcommand")
    r.add_argument("--flops", type=float, help="the budget in FLOPs (6 N D)")
    r.add_argument("--gpu_hours", type=float, help="the budget in GPU hours, with --tokens_per_sec and --gpu")
    r.add_argument("--tokens_per_sec", type=float, help="training throughput of --preset on one such GPU "
                   "(train.py --bench_steps)")
    r.add_argument("--preset", default="speedrun", help="the model that throughput was measured on")
    r.add_argument("--gpu", help="the GPU that throughput was measured on, said in the answer")
    a = p.parse_args(argv)
    if a.command == "fit":
        rows = points(a.logs)
        law = fit(*([row[k] for row in rows] for k in ("params", "tokens", "loss")))
        anchor = max(6 * row["params"] * row["tokens"] for row in rows)
        a.out.write_text(json.dumps({"law": law, "anchor_flops": anchor, "runs": rows}, indent=1) + "\n")
        print(f"{law_text(law)} over {len(rows)} runs; wrote {a.out}")
        if a.plot:
            plot(rows, law, a.plot)
            print(f"wrote {a.plot}")
        return law
    if (a.flops is None) == (a.gpu_hours is None):
        p.error("give the budget as either --flops C or --gpu_hours H (with --tokens_per_sec T and --gpu NAME)")
    if a.gpu_hours is not None and (a.tokens_per_sec is None or a.gpu is None):
        p.error("--gpu_hours needs --tokens_per_sec (measured for --preset) and --gpu (the GPU it was measured on)")
    if not a.fit.is_file():
        raise ScalingError(f"--fit {a.fit}: no such file; make it with python -m tools.scaling fit LOG... --out "
                           f"{a.fit} (the paper's MLM prefactors are not known here, so it cannot size a model alone)")
    fitted = json.loads(a.fit.read_text())
    flops = a.flops
    if flops is None:
        # the FLOP rate the bench reached, 6 N tokens/s, taken to hold for the recommended size too
        flops = 6 * params(a.preset) * a.tokens_per_sec * a.gpu_hours * 3600
        print(f"{a.gpu_hours:g} GPU hours on {a.gpu} at {a.tokens_per_sec:,.0f} tokens/s of {a.preset}: "
              f"{flops:.3g} FLOPs")
    if not flops > 0:
        raise ScalingError(f"the budget must be positive, got {flops:g} FLOPs")
    result = recommend(fitted["law"], fitted["anchor_flops"], flops)
    print(report(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except (RecordError, ScalingError) as e:
        sys.exit(f"scaling: {e}")
