"""
common/study.py: the tables, intervals and picture that pipeline.py prints and draws once its stages have run.

results_table (avg@n, pass@n, maj@n, best@n per model, mean ± std over seeds), study_tables (per-seed numbers,
bootstrap intervals over seeds and problems, paired differences between methods), split_table (avg@n on two
parts of the problems, such as the toy's gap), failure_table (samples that met a failed tool call), turn_table
(SOD's d_k and w_k by the kind of turn, from steps.jsonl), plot_study (validation accuracy against RL step, and
w_k / d_k per turn), and same_budget (the check that every student run had the same budget).
"""
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("study")


def results_table(results: dict, n: int) -> str:
    """Rows: models; columns: avg@n, pass@n, maj@n, best@n in percent (mean +- std over seeds when
    several)."""
    metrics = [f"avg@{n}", f"pass@{n}", f"maj@{n}", f"best@{n}(bootstrap)"]
    lines = ["| model | " + " | ".join(metrics) + " | tool calls / sample | tool error rate |",
             "|---|" + "---|" * (len(metrics) + 2)]
    for name, by_seed in results.items():
        runs = list(by_seed.values())
        cells = []
        for m in metrics + ["tool_calls_per_sample", "tool_error_rate"]:
            values = np.array([r[m] for r in runs]) * (1 if m == "tool_calls_per_sample" else 100)
            cells.append(f"{values.mean():.1f}" + (f" ± {values.std():.1f}" if len(values) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bootstrap_interval(per_seed_problem: np.ndarray, reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of a [seeds, problems] array, resampling seeds and problems
    (with replacement)."""
    rng = np.random.default_rng(seed)
    S, P = per_seed_problem.shape
    means = [per_seed_problem[rng.integers(0, S, S)][:, rng.integers(0, P, P)].mean() for _ in range(reps)]
    return tuple(np.percentile(means, [2.5, 97.5]))


def study_tables(results: dict, n: int, seeds: list[int]) -> str:
    """avg@n per student with its spread and interval over seeds and problems, and the paired differences."""
    per = {name: np.array([results[f"student {name}"][s]["per_problem_avg"] for s in seeds]) * 100
           for name in ("SFT", "GRPO", "OPD", "SOD")}                                      # [seeds, problems]
    lines = [f"| student ({len(seeds)} seeds) | avg@{n} | std over seeds | 95% interval | per seed |",
             "|---|---|---|---|---|"]
    for name, a in per.items():
        lo, hi = bootstrap_interval(a)
        lines.append(f"| {name} | {a.mean():.1f} | {a.mean(1).std():.1f} | [{lo:.1f}, {hi:.1f}] | "
                     + " / ".join(f"{x:.1f}" for x in a.mean(1)) + " |")
    lines += ["", "| paired difference (same seed, same SFT start) | mean | 95% interval | per seed |",
              "|---|---|---|---|"]
    for a, b in (("SOD", "OPD"), ("OPD", "GRPO"), ("SOD", "GRPO"), ("GRPO", "SFT")):
        diff = per[a] - per[b]
        lo, hi = bootstrap_interval(diff)
        lines.append(f"| {a} - {b} | {diff.mean():+.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                     + " / ".join(f"{x:+.1f}" for x in diff.mean(1)) + " |")
    return "\n".join(lines)


def failure_table(results: dict) -> str:
    """What each model did at evaluation after a tool call failed (mean over seeds): how many samples met a
    failed call, how many of those were still right, and how often the failed call was sent again."""
    lines = ["| model | samples that met a failed call (%) | of those, right (%) | failed calls resent (%) |",
             "|---|---|---|---|"]
    for name, by_seed in results.items():
        cells = []
        for key in ("samples_with_tool_error", "acc_after_tool_error", "failed_calls_resent"):
            values = [r.get(key) for r in by_seed.values() if r.get(key) is not None]
            cells.append(f"{100 * np.mean(values):.1f}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_table(results: dict, mask: list[bool], parts: tuple[str, str]) -> str:
    """avg@n of every model on two parts of the evaluated problems (mask: in the first part), mean +- std over
    seeds: where the toy's knowledge gap is, and where it is not."""
    mask = np.asarray(mask, dtype=bool)
    lines = [f"| model | {parts[0]}: {mask.sum()} (avg %) | {parts[1]}: {(~mask).sum()} (avg %) |",
             "|---|---|---|"]
    for name, by_seed in results.items():
        per = 100 * np.array([r["per_problem_avg"] for r in by_seed.values()])  # [seeds, problems]
        cells = [per[:, m].mean(1) for m in (mask, ~mask)]                     # [seeds] each
        lines.append(f"| {name} | " + " | ".join(f"{c.mean():.1f}" + (f" ± {c.std():.1f}" if len(c) > 1 else "")
                                                 for c in cells) + " |")
    return "\n".join(lines)


TURN_KINDS = ("the first turn", "later turns, no failed tool call before them",
              "turns after a failed tool call", "  of which right after a failure of the sandbox",
              "  of which right after an error of the model's code", "the failing turn itself")


def turn_kinds(record: dict) -> list[str]:
    """The rows of the divergence table an assistant turn of steps.jsonl belongs to (a turn right after a
    failure, and the failing turn itself, also count in the rows above them)."""
    if record["step"] == 1:
        kinds = [TURN_KINDS[0]]
    else:
        kinds = [TURN_KINDS[2] if record["after_tool_error"] else TURN_KINDS[1]]
    kinds += {"sandbox": [TURN_KINDS[3]], "code": [TURN_KINDS[4]]}.get(record.get("previous_failure"), [])
    return kinds + ([TURN_KINDS[5]] if record["tool_status"] == "error" else [])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def turn_table(run_dirs: list[Path]) -> str:
    """Mean d_k and w_k of every assistant turn the distilled students wrote in training (their
    steps.jsonl), by what came before the turn: the measurement behind SOD's premise."""
    rows = {kind: [] for kind in TURN_KINDS}
    for run in run_dirs:
        for r in read_jsonl(run / "steps.jsonl"):
            for kind in turn_kinds(r):
                rows[kind].append(r)
    runs = ", ".join(p.name for p in run_dirs)
    lines = [f"| turns of the rollouts of {runs} | turns | mean d_k | mean w_k |", "|---|---|---|---|"]
    for kind, rs in rows.items():
        means = [f"{np.mean([r[key] for r in rs]):.2f}" if rs else "-" for key in ("d", "w")]
        lines.append(f"| {kind} | {len(rs):,} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def learning_curves(root: Path, method: str, seeds: list[int]) -> tuple[list[int], np.ndarray]:
    """Held-out (validation) avg@n of a student's RL runs at every evaluated step: (steps, [seeds, steps])."""
    curves = []
    for seed in seeds:
        rows = read_jsonl(root / f"{method}-student-s{seed}" / "metrics.jsonl")
        curves.append({r["step"]: 100 * v for r in rows for k, v in r.items()
                       if k.startswith("eval/") and "avg@" in k})
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, np.array([[c[s] for s in steps] for c in curves])


def plot_study(root: Path, seeds: list[int], png: Path):
    """Left: validation avg@n against RL step for the four students (mean over seeds, shaded min to max;
    the SFT student is every run's step 0). Middle and right: SOD's mean w_k and d_k per assistant turn k,
    for turns with and without a failed tool call before them (all seeds, all RL steps)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s", png.name)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for method, color in (("grpo", "tab:gray"), ("opd", "tab:blue"), ("sod", "tab:red")):
        steps, values = learning_curves(root, method, seeds)                       # [seeds, steps]
        if steps:
            ax.plot(steps, values.mean(0), marker="o", color=color, label=method.upper())
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.1)
    ax.set(xlabel="RL step", ylabel="validation avg@n (%)",
           title=f"students, mean over {len(seeds)} seeds (min to max)")
    if steps:
        sft = values[:, 0]  # every RL run evaluates its starting checkpoint as step 0
        ax.axhline(sft.mean(), color="black", ls="--", lw=1, label="SFT (start)")
        ax.axhspan(sft.min(), sft.max(), color="black", alpha=0.06)
        ax.legend(loc="lower right")
    else:  # the student runs evaluated nothing on the validation split
        ax.text(0.5, 0.5, "no validation curves\n(pipeline.py --rl_validation all)", ha="center", va="center",
                transform=ax.transAxes)
    records = [r for s in seeds for r in read_jsonl(root / f"sod-student-s{s}" / "steps.jsonl")]
    for after, style in ((False, "-"), (True, "--")):
        rs = [r for r in records if r["step"] > 1 and r["after_tool_error"] == after]
        rs += [] if after else [r for r in records if r["step"] == 1]
        ks = sorted({r["step"] for r in rs if r["step"] <= 8})
        ks = [k for k in ks if sum(r["step"] == k for r in rs) >= 20]   # enough turns for a mean
        label = "after a failed tool call" if after else "no failed tool call before"
        for ax, key in ((axes[1], "w"), (axes[2], "d")):
            ax.plot(ks, [np.mean([r[key] for r in rs if r["step"] == k]) for k in ks], style, marker="o",
                    color="tab:red", label=label)
    axes[1].legend(fontsize=8)
    finish_step_axes(fig, axes[1], axes[2], png, title="SOD step")
    plt.close(fig)


def finish_step_axes(fig, ax_w, ax_d, png: Path, title: str = "step"):
    """Label the axes of w_k and d_k against the assistant turn k, and write the figure."""
    ax_w.set(xlabel="assistant turn k", ylabel="mean w_k", title=f"{title} weights")
    ax_d.set(xlabel="assistant turn k", ylabel="mean d_k = mean |l_S - l_T|", title=f"{title} divergence")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def same_budget(root: Path, students: dict) -> dict:
    """The RL budget every student run recorded in its run.json, and the SFT checkpoint each started from.
    Refuses to report a table if any budget differs, if one method's runs differ in learning rate (each method
    has its own), or if two runs of one seed started from different checkpoints."""
    keys = ("steps", "prompts_per_step", "n_samples", "mini_batches", "ppo_epochs",
            "max_response_tokens", "temperature", "top_p", "tool_failure_rate", "toy_steps", "kl_coef",
            "eval_every", "eval_prompts", "eval_n")
    budgets, starts, lrs = {}, {}, {}
    for method, by_seed in students.items():
        for seed, path in by_seed.items():
            config = json.loads((Path(path).parent / "run.json").read_text())["config"]
            budgets[path] = {k: config[k] for k in keys}
            starts.setdefault(seed, set()).add(config.get("student") or config["model"])
            lrs.setdefault(method, set()).add(config["lr"])
    distinct = {json.dumps(b, sort_keys=True) for b in budgets.values()}
    if len(distinct) != 1:
        raise SystemExit(f"the student runs did not have the same budget: {distinct}")
    for method, values in lrs.items():
        if len(values) != 1:
            raise SystemExit(f"the {method} runs did not share one learning rate: {sorted(values)}")
    for seed, paths in starts.items():
        if len(paths) != 1:
            raise SystemExit(f"the student runs of seed {seed} started from different checkpoints: {paths}")
    return dict(json.loads(distinct.pop()), lr={method: values.pop() for method, values in lrs.items()})
