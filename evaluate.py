"""
evaluate.py: stage 4, avg@k, pass@k and maj@k on the same multi-turn tool loop as training.

Each model answers every problem n times (temperature 1.0, top_p 0.6, up to 16 turns with the code
interpreter, as the reference evaluates). For problem i with c_i correct answers out of n:

    avg@n    = mean_i  c_i / n                                   (the paper's "average@32")
    pass@k   = mean_i  1 - C(n - c_i, k) / C(n, k)               (unbiased, Chen et al. 2021)
    maj@k    = mean_i  E_{S ~ k of the n samples} [acc of the majority answer of S]
    best@k   = the reference's bootstrap: 1000 draws of k samples *with replacement* (seed 42),
               max acc per draw, averaged. This is what the reference logs as "pass@k"; it estimates
               1 - (1 - c/n)^k, not pass@k, so both are reported and labelled.

maj@k follows the reference's vote: answers are the graders' `pred` strings, an empty pred ("" when
nothing was boxed) is a vote like any other, and a tie goes to the answer seen first. Our maj@k takes
the exact expectation over all size-k subsets (without replacement, in sample order) when there are
at most `MAJ_EXACT_LIMIT` subsets, else a seeded Monte Carlo over subsets; `bootstrap_maj_at_k` is
the reference's version (with replacement), reported as maj@k (bootstrap).

Writes to --out_dir: results.md (the table), results.json (every number), generations.jsonl (every
sample: problem id, sample index, text, pred, acc, turns, tool calls).

    python evaluate.py                                         # toy held-out split, the toy SFT checkpoints
    python evaluate.py --model runs/sft-student/final runs/sod-student/final --n_samples 8
    python evaluate.py --model runs/sod-0.6b/final \\
        --data aime_2024_problems.parquet,aime_2025_problems.parquet,gpqa_diamond.parquet,lcb_v6.parquet \\
        --n_samples 32 --max_response_tokens 20480 --backend vllm \\
        --tool_junction reference                                   # the paper's protocol
"""
import itertools
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

import rollout
import tools
from common import chat_template, dist, engines, models, runs
from common.cli import arg, not_a_flag, run_script
from common.data import drop_long_prompts

log = logging.getLogger("evaluate")
MAJ_EXACT_LIMIT = 20_000


@dataclass
class Config(rollout.RolloutConfig):
    """Evaluate models with the tool loop: avg@n, pass@k, maj@k, and the reference's bootstrap best@k."""
    model: list = arg(["runs/sft-student/final"], "one or more models (paths, HF names, "
                                                  "toy-student/toy-teacher)")
    data: str = arg("toy", "'toy' (the toy test split), 'toy:valid', or comma-separated .parquet/.jsonl "
                           "eval files")
    toy_steps: str = arg("2-4", "toy problems need this many dependent tool calls (from 1 to 8)")
    num_prompts: int = arg(64, "problems per data file (0: all)")
    n_samples: int = arg(4, "samples per problem, n (reference 32)")
    # rollout.RolloutConfig fields whose evaluation default differs from training's
    top_p: float = arg(0.6, "nucleus sampling (reference 0.6 in evaluation)")
    max_prompt_tokens: int = arg(4096, "prompts longer than this, measured with the chat template, "
                                       "are dropped (reference 4096 in evaluation)")
    # the reward's shaping: an evaluation reports accuracy, not reward, so these are no flags here
    tool_shaping: str = not_a_flag("reference", "wrong-answer shaping of the reward")
    overlong_buffer: int = not_a_flag(0, "DAPO overlong penalty buffer")
    overlong_penalty: float = not_a_flag(1.0, "DAPO overlong penalty factor")
    out_dir: str = arg("runs/eval", "results.md, results.json, generations.jsonl")
    seed: int = arg(0, "sampling seed")
    device: str = arg("", "cpu or cuda (empty: cuda if available)")


# -----------------------------------------------------------------------------
# Metrics: pure functions of per-sample accuracies and predictions

def avg_at_n(accs_per_problem: list[list[bool]]) -> float:
    """Mean accuracy over each problem's samples, then over problems."""
    return float(np.mean([np.mean(a) for a in accs_per_problem]))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without
    replacement, contain a correct one. Python's integers are exact and unbounded, and int / int rounds
    correctly, so this is the exact value as a float for any n (no overflow at n = 1024 or beyond)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total  # one correctly rounded division of exact integers


def majority_vote_acc(preds: list[str], accs: list[bool]) -> bool:
    """The reference's vote: the most frequent pred wins, ties go to the pred seen first, and the
    result is the acc of the first sample carrying that pred. Empty preds vote too."""
    votes = Counter(preds)  # Counter keeps first-seen order, and max() returns the first maximum
    winner = max(votes, key=votes.get)
    return accs[preds.index(winner)]


def maj_at_k(preds: list[str], accs: list[bool], k: int, num_samples: int = 2000, seed: int = 0) -> float:
    """Expected majority-vote accuracy of k of the n samples drawn without replacement (sample order kept).
    Exact over all C(n, k) subsets when there are few enough, else a seeded Monte Carlo estimate."""
    n = len(preds)
    if math.comb(n, k) <= MAJ_EXACT_LIMIT:
        subsets = itertools.combinations(range(n), k)
        values = [majority_vote_acc([preds[i] for i in s], [accs[i] for i in s]) for s in subsets]
    else:
        rng = np.random.default_rng(seed)
        values = []
        for _ in range(num_samples):
            s = np.sort(rng.choice(n, size=k, replace=False))
            values.append(majority_vote_acc([preds[i] for i in s], [accs[i] for i in s]))
    return float(np.mean(values))


def _bootstrap(values: list, k: int, reduce_fn, n_bootstrap: int = 1000, seed: int = 42) -> float:
    """The reference's bootstrap (verl metric_utils): reseeds numpy's global RNG on every call,
    draws k indices with replacement n_bootstrap times, and averages reduce_fn over the draws."""
    np.random.seed(seed)
    draws = [reduce_fn([values[i] for i in np.random.choice(len(values), size=k, replace=True)])
             for _ in range(n_bootstrap)]
    return float(np.mean(draws))


def bootstrap_best_at_k(accs: list[bool], k: int, n_bootstrap: int = 1000, seed: int = 42) -> float:
    """What the reference logs as pass@k ("best@k"): mean over bootstrap draws of max acc."""
    return _bootstrap([float(a) for a in accs], k, max, n_bootstrap, seed)


def bootstrap_maj_at_k(preds: list[str], accs: list[bool], k: int, n_bootstrap: int = 1000,
                       seed: int = 42) -> float:
    """The reference's maj@k: the same bootstrap, reduced by the majority vote."""
    pairs = list(zip(preds, accs))
    return _bootstrap(pairs, k, lambda d: float(majority_vote_acc([p for p, _ in d], [a for _, a in d])),
                      n_bootstrap, seed)


def powers_of_two_up_to(n: int) -> list[int]:
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return ks + ([n] if n not in ks else [])


def problem_metrics(samples_by_problem: dict) -> dict:
    """All metrics of one benchmark from {problem: [(pred, acc), ...]} (every problem with the same n)."""
    accs = [[a for _, a in s] for s in samples_by_problem.values()]
    preds = [[p for p, _ in s] for s in samples_by_problem.values()]
    n = len(accs[0])
    out = {"problems": len(accs), "n": n, f"avg@{n}": avg_at_n(accs)}
    for k in powers_of_two_up_to(n):
        out[f"pass@{k}"] = float(np.mean([pass_at_k(n, sum(a), k) for a in accs]))
    out[f"maj@{n}"] = float(np.mean([maj_at_k(p, a, n) for p, a in zip(preds, accs)]))
    out[f"best@{n}(bootstrap)"] = float(np.mean([bootstrap_best_at_k(a, n) for a in accs]))
    out[f"maj@{n}(bootstrap)"] = float(np.mean([bootstrap_maj_at_k(p, a, n) for p, a in zip(preds, accs)]))
    return out


# -----------------------------------------------------------------------------
# Running a model on the benchmarks

def load_benchmarks(cfg: Config) -> dict[str, list[dict]]:
    """{benchmark name: prompts}. The toy split, or one benchmark per file (named by its data_source)."""
    if cfg.data.startswith("toy"):
        split = "eval" if cfg.data == "toy" else cfg.data.split(":")[1]
        return {"toy": rollout.load_prompts(f"toy:{split}", cfg.num_prompts or 256, toy_steps=cfg.toy_steps)}
    benchmarks = {}
    for path in cfg.data.split(","):
        prompts = rollout.load_prompts(path.strip(), cfg.num_prompts or None, wrapper_choice=cfg.wrapper_choice)
        benchmarks[prompts[0].data_source or Path(path).stem] = prompts
    return benchmarks


# problems rolled out together; their seed is fixed by their position, not by the ranks
PROBLEMS_PER_ROLLOUT = 64


class Sample(NamedTuple):
    """One answer to one problem: what generations.jsonl and the metrics read."""
    problem: int          # index of the problem in its benchmark
    sample: int           # 0 .. n-1
    pred: str
    acc: bool
    text: str
    turns: int
    tool_calls: int
    tool_errors: int
    stop_reason: str
    resent: list          # per failed call answered by another turn: was the same code sent again


def evaluate_engine(engine, tokenizer, benchmarks: dict, cfg: Config, d=None, generations_file=None,
                    model_name="") -> dict:
    """Roll out every benchmark with an engine (HF model or vLLM) and compute its metrics.

    The problems go in fixed chunks of PROBLEMS_PER_ROLLOUT, each sampled with its own seed; under torchrun
    the ranks share the chunks out and gather every sample, so the numbers do not depend on the number of
    ranks."""
    d = d or dist.Dist()
    results = {}
    for name, prompts in benchmarks.items():
        t0 = time.time()
        prompts = drop_long_prompts(prompts, tokenizer, cfg.max_prompt_tokens, name=name)
        if not prompts:
            raise SystemExit(f"{name}: every problem is longer than --max_prompt_tokens "
                             f"{cfg.max_prompt_tokens}")
        chunks = range(0, len(prompts), PROBLEMS_PER_ROLLOUT)
        samples: list[Sample] = []
        for c in chunks[d.rank::d.world]:
            part = prompts[c:c + PROBLEMS_PER_ROLLOUT]
            trajs = rollout.rollout(engine, tokenizer, part, cfg.n_samples, cfg, seed=cfg.seed,
                                    progress=d.main, first_prompt=c)
            samples += [Sample(t.prompt_index, j % cfg.n_samples, t.pred, t.acc, t.text, t.num_turns,
                               t.num_tool_calls, t.num_tool_errors, t.stop_reason, resent_calls(t.turns))
                        for j, t in enumerate(trajs)]
        samples = sorted(s for part in dist.all_gather(samples, d) for s in part)
        by_problem = defaultdict(list)
        for s in samples:
            by_problem[s.problem].append((s.pred, s.acc))
            if generations_file is not None:
                generations_file.write(json.dumps({
                    "model": model_name, "benchmark": name, "problem_id": prompts[s.problem].id,
                    "sample": s.sample, "text": s.text, "pred": s.pred, "acc": s.acc, "turns": s.turns,
                    "tool_calls": s.tool_calls, "tool_errors": s.tool_errors, "stop_reason": s.stop_reason},
                    default=str) + "\n")
        results[name] = problem_metrics(by_problem)
        results[name]["per_problem_avg"] = [float(np.mean([a for _, a in by_problem[p]]))
                                            for p in sorted(by_problem)]
        # samples that met a failed tool call, and their accuracy
        with_error = [s.acc for s in samples if s.tool_errors > 0]
        results[name]["samples_with_tool_error"] = len(with_error) / max(1, len(samples))
        results[name]["acc_after_tool_error"] = float(np.mean(with_error)) if with_error else None
        resent = [r for s in samples for r in s.resent]
        results[name]["failed_calls_resent"] = float(np.mean(resent)) if resent else None
        results[name]["seconds"] = round(time.time() - t0, 1)
        results[name]["tool_calls_per_sample"] = float(np.mean([s.tool_calls for s in samples]))
        results[name]["tool_error_rate"] = (sum(s.tool_errors for s in samples)
                                            / max(1, sum(s.tool_calls for s in samples)))
    return results


def resent_calls(turns: list) -> list[bool]:
    """For every failed tool call that the model answered with another turn (rollout.Turn records): does that
    turn send the same code again (a retry), rather than another call or a final answer?"""
    return [b.tool_call is not None and str(b.tool_call) == str(a.tool_call)
            for a, b in zip(turns, turns[1:]) if a.tool_status == "error"]


def greedy_accuracy(model, tokenizer, data: str = "toy:valid", num_prompts: int = 64,
                    toy_steps: str = "2-4") -> float:
    """Accuracy with greedy decoding, one sample per problem (sft.py's check at the end, on the validation
    split)."""
    prompts = rollout.load_prompts(data, num_prompts, toy_steps=toy_steps)
    trajs = rollout.rollout(model, tokenizer, prompts, 1, rollout.RolloutConfig(temperature=0.0))
    return sum(t.acc for t in trajs) / len(trajs)


def markdown_table(all_results: dict) -> str:
    benchmarks = list(next(iter(all_results.values())).keys())
    metric_names = [m for m in next(iter(all_results.values()))[benchmarks[0]] if "@" in m]
    head = "| model | " + " | ".join(f"{b} {m}" for b in benchmarks for m in metric_names) + " |"
    lines = [head, "|" + "---|" * (1 + len(benchmarks) * len(metric_names))]
    for model, res in all_results.items():
        lines.append(f"| {model} | "
                     + " | ".join(f"{100 * res[b][m]:.1f}" for b in benchmarks for m in metric_names) + " |")
    return "\n".join(lines)


def main(cfg: Config) -> dict:
    model_paths = cfg.model if isinstance(cfg.model, list) else [cfg.model]
    for m in model_paths:  # every input is checked before anything loads or is written
        models.check_model_path(m)
        chat_template.check_declares_tool(models.load_tokenizer(m, cfg.chat_template), tools.TOOL_SCHEMA, m)
    rollout.check_rollout_settings(cfg)
    tools.setup_sandbox(cfg, cfg.data)
    backend = engines.resolve_backend(cfg.backend)
    benchmarks = load_benchmarks(cfg)
    first_tokenizer = models.load_tokenizer(model_paths[0], cfg.chat_template)
    # a benchmark whose every prompt is too long stops here, not later
    for name, prompts in benchmarks.items():
        if not drop_long_prompts(prompts, first_tokenizer, cfg.max_prompt_tokens, name=name):
            raise SystemExit(f"{name}: every problem is longer than --max_prompt_tokens "
                             f"{cfg.max_prompt_tokens}")
    d, device = dist.init_processes(cfg.device)  # torchrun: the ranks share the problems out
    out_dir = Path(cfg.out_dir)
    runs.lock_out_dir(out_dir, d)
    all_results = {}
    generations = out_dir / ".generations.jsonl.tmp"
    with open(generations, "w") if d.main else open(os.devnull, "w") as gen_file:
        for m in model_paths:
            tokenizer = models.load_tokenizer(m, cfg.chat_template)
            if backend == "vllm":
                engine = engines.make_vllm_engine(m, cfg.max_prompt_tokens + cfg.max_response_tokens,
                                                  seed=cfg.seed, d=d, kv_cache_gb=cfg.vllm_kv_cache_gb)
            else:
                engine = models.load_model(m, device=device, seed=cfg.seed)
            all_results[m] = evaluate_engine(engine, tokenizer, benchmarks, cfg, d, gen_file, model_name=m)
            del engine
    if d.main:  # the outputs appear whole, once every model is evaluated
        os.replace(generations, out_dir / "generations.jsonl")
        table = markdown_table(all_results)
        (out_dir / "results.md").write_text(table + "\n")
        (out_dir / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": all_results},
                                                         indent=2))
        print(table)
    return all_results


if __name__ == "__main__":
    run_script(main, Config)
