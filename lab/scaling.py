"""Scaling laws on a laptop: train a grid of small GPTs and fit L(N, D).

The idea. Train a language model with N parameters on D tokens and its loss on
held-out text falls as both grow, and it falls smoothly: plotted against N or D on
log axes, the curves are nearly straight lines bending towards a floor. Hoffmann et
al. (2022, "Chinchilla") summarised it with one formula,

    L(N, D) = E + A / N^alpha + B / D^beta

E is the loss no model can beat (the text's own unpredictability); A / N^alpha is what
a finite model costs; B / D^beta is what finite data costs. Training costs about
C = 6 N D floating-point operations (2 per parameter per token forward, 4 backward), so
for a fixed budget C you can buy a big model that sees few tokens or a small model that
sees many. Put D = C / (6 N) into L and minimise over N:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta))

When alpha and beta are about equal, N and D should grow together (Chinchilla found
about 20 tokens per parameter), which is why a smaller model trained on more text can
beat a bigger one trained on less for the same cost.

What this script does. It trains every pair of 4 model sizes (1x32 .. 4x128, 14k to
0.8M parameters) and 3 token budgets (0.12M, 0.37M and 1.0M characters of tiny
Shakespeare, the last one a single pass over the training text), 12 runs, each with its
own warmup + cosine schedule ending at its own budget (Chinchilla's lesson: a run cut
short in the middle of a longer schedule looks worse than it is). It scores every run
on the same validation windows, fits the formula, and reports the split the fit
recommends for a budget (--budget, default: the largest run's compute).

How the fit works (NumPy only). For fixed alpha and beta the formula is linear in
E, A and B, so ordinary least squares solves it exactly. We therefore search a grid
of (alpha, beta) pairs, solve the 3-unknown least squares at each (all at once, as a
batch of 3x3 normal equations), keep the pairs whose E, A, B are all >= 0 and pick the
smallest squared error; then search a 10x finer grid around the winner. Three checks on
the answer: refit with each run left out in turn ("leave_one_out"); refit with E held
at 0.5, 1.0 and 1.5 ("E_sensitivity"); and list the runs that beat every cheaper run
("measured_frontier"), which is what the grid says without any formula.

What a model this small can and cannot show. It shows the shape: bigger is better at
a fixed token count, more tokens are better at a fixed size, and the fitted best model
size grows with the budget. It cannot pin down the numbers, and here is how to see it
in the results:

- The runs are not yet in the regime the formula describes. At 768 tokens per step the
  bigger models are limited by how many steps they get; their loss still falls faster
  from 0.37M to 1M tokens than from 0.12M to 0.37M, which no power law with a floor
  does. The fit answers with E near 0 and a small beta.
- E cannot be seen. Holding it at 0.5, 1.0 or 1.5 changes the error of the fit a
  little and the recommended model size several-fold.
- The recommended split lies outside the grid: a model about the size of our smallest
  one trained for dozens of passes over the text, thousands of tokens per parameter
  instead of Chinchilla's ~20. The formula assumes every token is new; repeated text
  is worth less (Muennighoff et al., 2023), and 1 MB cannot supply new tokens.
- Twelve points, five unknowns, one seed, a learning rate rule not tuned per size:
  the exponents move a lot when one point is left out.

So read the measured frontier (with this little text, the best run for every budget in
the grid is the one that uses all of it) and the method; treat the fitted exponents and
the compute-optimal split as a worked example, not a measurement. Character-level
models on one small book also sit in a different regime from word-piece LLMs trained
on trillions of tokens.

    python lab/scaling.py            # ~4 min on 2 idle cores (nice'd, one BLAS thread)
    python lab/scaling.py --quick    # seconds: tiny grid, for tests
"""
from __future__ import annotations

import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `python lab/scaling.py`
from lab.common import (TrainSpec, eval_loss, lab_parser, lm_batches, log,  # noqa: E402
                        require_matplotlib, shakespeare_char, train_gpt, write_results)
from tinygrad_lite import cpu  # noqa: E402

# (n_layer, n_embd) of each model size, and training iterations of each token budget
SIZES = [(1, 32), (2, 64), (3, 96), (4, 128)]
ITERS = [160, 480, 1300]  # x 12 x 64 = 768 tokens per iteration: 0.12M, 0.37M, 1.0M tokens
BATCH, BLOCK = 12, 64
QUICK_SIZES = [(1, 16), (1, 24), (1, 32)]
QUICK_ITERS = [8, 16, 32]
QUICK_BATCH, QUICK_BLOCK = 4, 32


def width_lr(n_embd: int) -> float:
    """3e-3 at width 128, larger for narrower models (lr ~ 1/sqrt(width), a rough rule).

    train.py's 1e-3 suits its 2000-iteration run; runs of a few hundred steps need bigger
    ones (measured: 4x128 after 480 iterations, val loss 2.31 at 1e-3, 2.21 at 3e-3), and an
    undertrained point bends the fit more than anything else."""
    return 3e-3 * (128 / n_embd) ** 0.5


def count_params(model) -> int:
    """N: the parameters that cost 6 FLOPs per token (all but the position table, which is
    looked up, not multiplied), as in GPT.flops_per_token."""
    return model.num_parameters() - (model.wpe.weight.size if model.wpe is not None else 0)


# ----------------------------------------------------------------------------- the fit


def solve_eab(N: np.ndarray, D: np.ndarray, L: np.ndarray, alphas: np.ndarray, betas: np.ndarray,
              E: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Least squares E, A, B for every (alpha, beta) pair of the grid at once.

    N, D, L (P,) runs; alphas (Ga,), betas (Gb,). Returns coef (Ga, Gb, 3) = (E, A, B)
    in the units of N / N0 and D / D0 (N0, D0 the geometric means, which keeps the
    columns near 1 and the small systems well conditioned) and sse (Ga, Gb), inf where a
    coefficient came out negative. With E given, only A and B are solved for.
    """
    n = N / np.exp(np.log(N).mean())
    d = D / np.exp(np.log(D).mean())
    xn = n[None, :] ** -alphas[:, None]  # (Ga, P)
    xd = d[None, :] ** -betas[:, None]  # (Gb, P)
    Ga, Gb, P = len(alphas), len(betas), len(L)
    columns = [np.ones((Ga, Gb, P))] if E is None else []
    columns += [np.broadcast_to(xn[:, None, :], (Ga, Gb, P)), np.broadcast_to(xd[None, :, :], (Ga, Gb, P))]
    X = np.stack(columns, axis=-1)  # (Ga, Gb, P, k), k = 3 or 2
    y = L if E is None else L - E
    k = X.shape[-1]
    gram = np.einsum("abpi,abpj->abij", X, X) + 1e-12 * np.eye(k)  # (Ga, Gb, k, k) normal equations
    rhs = np.einsum("abpi,p->abi", X, y)  # (Ga, Gb, k)
    coef = np.linalg.solve(gram, rhs[..., None])[..., 0]  # (Ga, Gb, k)
    sse = ((np.einsum("abpi,abi->abp", X, coef) - y) ** 2).sum(axis=-1)  # (Ga, Gb)
    sse[(coef < 0).any(axis=-1)] = np.inf
    if E is not None:
        coef = np.concatenate([np.full((Ga, Gb, 1), E), coef], axis=-1)
    return coef, sse


def fit_scaling_law(N: np.ndarray, D: np.ndarray, L: np.ndarray, E: float | None = None) -> dict:
    """L ~ E + A / N^alpha + B / D^beta by a coarse then a fine grid over (alpha, beta)
    (E fitted too unless given)."""
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    lo, hi = 0.02, 2.0
    alphas = betas = np.linspace(lo, hi, 100)
    for _ in range(2):  # coarse grid, then a 10x finer one around the best pair
        coef, sse = solve_eab(N, D, L, alphas, betas, E)
        if not np.isfinite(sse).any():
            raise ValueError("no (alpha, beta) on the grid gives E, A, B >= 0")
        i, j = np.unravel_index(np.argmin(sse), sse.shape)
        step_a, step_b = alphas[1] - alphas[0], betas[1] - betas[0]
        best = (alphas[i], betas[j], coef[i, j], sse[i, j])
        alphas = np.linspace(max(lo, best[0] - step_a), min(hi, best[0] + step_a), 41)
        betas = np.linspace(max(lo, best[1] - step_b), min(hi, best[1] + step_b), 41)
    alpha, beta, (E_fit, a0, b0), best_sse = best
    N0, D0 = np.exp(np.log(N).mean()), np.exp(np.log(D).mean())
    A, B = a0 * N0 ** alpha, b0 * D0 ** beta  # back to raw units: A / N^alpha = a0 / (N/N0)^alpha
    pred = E_fit + A / N ** alpha + B / D ** beta
    return {"E": float(E_fit), "A": float(A), "B": float(B), "alpha": float(alpha), "beta": float(beta),
            "E_fixed": E is not None, "rmse": float(np.sqrt(best_sse / len(L))),
            "max_abs_error": float(np.abs(pred - L).max()),
            "alpha_or_beta_at_grid_edge": bool(min(alpha, beta) <= lo + 1e-9 or max(alpha, beta) >= hi - 1e-9)}


def predict(fit: dict, N, D):
    return fit["E"] + fit["A"] / np.asarray(N, float) ** fit["alpha"] + fit["B"] / np.asarray(D, float) ** fit["beta"]


def compute_optimal(fit: dict, C: float) -> dict:
    """The (N, D) with 6 N D = C that the fitted law says gives the lowest loss."""
    a, b = fit["alpha"], fit["beta"]
    G = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
    N = G * (C / 6) ** (b / (a + b))
    D = C / (6 * N)
    return {"C": C, "N": N, "D": D, "tokens_per_param": D / N, "loss": float(predict(fit, N, D))}


# ------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = lab_parser(__doc__)
    parser.add_argument("--budget", type=float, default=None,
                        help="FLOP budget C for the compute-optimal split (default: the largest run's 6ND)")
    args = parser.parse_args(argv)
    cpu.tune()  # malloc and threads, as train.py does (tinygrad_lite/cpu.py)
    plt = require_matplotlib()
    out = Path(args.out)
    start = time.perf_counter()
    sizes, iters = (QUICK_SIZES, QUICK_ITERS) if args.quick else (SIZES, ITERS)
    batch, block = (QUICK_BATCH, QUICK_BLOCK) if args.quick else (BATCH, BLOCK)
    tokenizer, train_ids, val_ids = shakespeare_char(out / "data")

    runs = []
    for n_layer, n_embd in sizes:
        for n_iters in iters:
            spec = TrainSpec(n_layer=n_layer, n_head=4 if n_embd % 4 == 0 else 2, n_embd=n_embd,
                             block_size=block, batch_size=batch, iters=n_iters, lr=width_lr(n_embd),
                             seed=args.seed)
            model, summary = train_gpt(spec, tokenizer.vocab_size, lm_batches(train_ids, batch, block))
            N, D = count_params(model), n_iters * batch * block
            val = eval_loss(model, val_ids, block, n_batches=4 if args.quick else 40)
            runs.append({"n_layer": n_layer, "n_embd": n_embd, "iters": n_iters, "N": N, "D": D,
                         "C": 6 * N * D, "val_loss": val, "train_loss": summary["final_train_loss"],
                         "seconds": summary["seconds"]})
            log(f"{n_layer}x{n_embd:<4d} N={N:>8,d} D={D:>9,d}  val {val:.3f}  ({summary['seconds']:.0f}s)")

    N, D, L = (np.array([r[k] for r in runs], float) for k in ("N", "D", "val_loss"))
    fit = fit_scaling_law(N, D, L)
    loo = [fit_scaling_law(np.delete(N, i), np.delete(D, i), np.delete(L, i)) for i in range(len(L))]
    C_max = float((6 * N * D).max())
    budget = args.budget or C_max
    optimal = compute_optimal(fit, budget)
    C_min = float((6 * N * D).min())
    table = [compute_optimal(fit, c) for c in (C_min, float(np.sqrt(C_min * C_max)), C_max, 10 * C_max, 100 * C_max)]
    loo_n = [compute_optimal(f, budget)["N"] for f in loo]
    # E is the hardest number to see from a small grid: how much does the answer move with it?
    sensitivity = []
    for E in (0.5, 1.0, 1.5):
        if E < L.min():
            f = fit_scaling_law(N, D, L, E=E)
            sensitivity.append({"E": E, "alpha": f["alpha"], "beta": f["beta"], "rmse": f["rmse"],
                                "N_opt": compute_optimal(f, budget)["N"], "D_opt": compute_optimal(f, budget)["D"]})
    frontier, best = [], np.inf  # the measured runs that beat every cheaper run
    for r in sorted(runs, key=lambda r: r["C"]):
        if r["val_loss"] < best:
            best = r["val_loss"]
            frontier.append({k: r[k] for k in ("n_layer", "n_embd", "N", "D", "C", "val_loss")})
    results = {
        "quick": args.quick, "batch_size": batch, "block_size": block, "runs": runs,
        "fit": fit, "formula": "L = E + A / N^alpha + B / D^beta (N params without wpe, D training tokens)",
        "fit_method": "grid over (alpha, beta) in [0.02, 2], least squares for E, A, B >= 0, then a finer grid",
        "compute_optimal": {**optimal, "exponent_N": fit["beta"] / (fit["alpha"] + fit["beta"]),
                            "exponent_D": fit["alpha"] / (fit["alpha"] + fit["beta"]),
                            "N_within_trained_sizes": bool(N.min() <= optimal["N"] <= N.max()),
                            "D_within_trained_budgets": bool(D.min() <= optimal["D"] <= D.max()),
                            "epochs_of_the_training_text": optimal["D"] / len(train_ids)},
        "E_near_zero": fit["E"] < 0.05,
        "E_sensitivity": sensitivity,
        "measured_frontier": frontier,
        "train_tokens_available": len(train_ids),
        "compute_optimal_table": table,
        "leave_one_out": {
            "alpha": [min(f["alpha"] for f in loo), max(f["alpha"] for f in loo)],
            "beta": [min(f["beta"] for f in loo), max(f["beta"] for f in loo)],
            "E": [min(f["E"] for f in loo), max(f["E"] for f in loo)],
            "N_opt_at_budget": [min(loo_n), max(loo_n)]},
        "wall_s": time.perf_counter() - start,
    }
    loo_range = results["leave_one_out"]
    log(f"fit: L = {fit['E']:.3f} + {fit['A']:.3g}/N^{fit['alpha']:.3f} + {fit['B']:.3g}/D^{fit['beta']:.3f} "
        f"(rmse {fit['rmse']:.3f}); leave-one-out: alpha {loo_range['alpha'][0]:.3f}..{loo_range['alpha'][1]:.3f}, "
        f"beta {loo_range['beta'][0]:.3f}..{loo_range['beta'][1]:.3f}")
    log(f"compute-optimal at C = {budget:.3g} FLOPs: N = {optimal['N']:,.0f}, D = {optimal['D']:,.0f} "
        f"({optimal['tokens_per_param']:.1f} tokens/param), predicted loss {optimal['loss']:.3f}")
    for row in sensitivity:
        log(f"with E fixed at {row['E']}: alpha {row['alpha']:.3f}, beta {row['beta']:.3f}, rmse {row['rmse']:.3f}, "
            f"N_opt {row['N_opt']:,.0f}, D_opt {row['D_opt']:,.0f}")
    log("measured frontier (each run beats every cheaper one): " + ", ".join(
        f"{r['n_layer']}x{r['n_embd']}@{r['D'] / 1e6:.2f}M tok: {r['val_loss']:.3f}" for r in frontier))

    fig = plot(plt, runs, fit, table, optimal)
    write_results(out, "scaling", results, fig)
    return 0


def plot(plt, runs: list[dict], fit: dict, table: list[dict], optimal: dict):
    N = np.array([r["N"] for r in runs], float)
    D = np.array([r["D"] for r in runs], float)
    L = np.array([r["val_loss"] for r in runs])
    C = 6 * N * D
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = sorted(set(N))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(sizes)))
    c_line = np.logspace(np.log10(C.min() / 3), np.log10(C.max() * 30), 200)
    for n, color in zip(sizes, colors):
        mine = N == n
        ax.scatter(C[mine], L[mine], color=color, s=45, zorder=3, label=f"N = {n:,.0f} (measured)")
        grid = (c_line >= C[mine].min() / 1.5) & (c_line <= C[mine].max() * 1.5)
        ax.plot(c_line, predict(fit, n, c_line / (6 * n)), color=color, alpha=0.35, ls=":")
        ax.plot(c_line[grid], predict(fit, n, c_line[grid] / (6 * n)), color=color)
    frontier = [compute_optimal(fit, c)["loss"] for c in c_line]
    ax.plot(c_line, frontier, "k--", lw=1.2, label="fit: best N for each C")
    ax.scatter([optimal["C"]], [optimal["loss"]], marker="*", s=220, color="crimson", zorder=4,
               label=f"optimum at C={optimal['C']:.2g}: N={optimal['N']:,.0f}, D={optimal['D']:,.0f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C = 6 N D (FLOPs)")
    ax.set_ylabel("validation loss (nats / char)")
    title = f"fit: L = {fit['E']:.2f} + {fit['A']:.3g}/N^{fit['alpha']:.2f} + {fit['B']:.3g}/D^{fit['beta']:.2f}"
    if fit["E"] < 0.05:
        title += "\n(E near 0: this grid cannot see the loss floor)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7.5)
    ax.grid(alpha=0.3, which="both")

    rows = table[:4]  # the grid's smallest, middle and largest budget, and 10x the largest
    n_lo = min(N.min(), min(r["N"] for r in rows)) / 3
    n_hi = max(N.max(), max(r["N"] for r in rows)) * 10
    n_line = np.logspace(np.log10(n_lo), np.log10(n_hi), 300)
    for row, color in zip(rows, plt.cm.plasma(np.linspace(0, 0.8, len(rows)))):
        c = row["C"]
        ax2.plot(n_line, predict(fit, n_line, c / (6 * n_line)), color=color, label=f"C = {c:.2g}")
        ax2.scatter([row["N"]], [row["loss"]], color=color, marker="o", edgecolor="k", zorder=3)
    ax2.axvspan(N.min(), N.max(), color="grey", alpha=0.12, label="sizes trained")
    ax2.set_xscale("log")
    lows = [r["loss"] for r in rows]
    ax2.set_ylim(min(lows) - 0.2, max(L.max(), max(lows)) + 0.6)
    ax2.set_xlabel("parameters N")
    ax2.set_ylabel("predicted validation loss")
    ax2.set_title("fitted isoFLOP curves: the best N (dot) grows with C", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
