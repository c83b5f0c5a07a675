"""
scripts/speed.py: the speed claims of docs/speed.md, each measured side by side in one run.

  1. Step weights: sod_distill.step_divergence + step_weights against the authors' per-token loop
     (verl/trainer/ppo/ray_trainer.py: _extract_step_boundaries and compute_stepwise_opd_weights) on the same
     float32 log-probs, one thread. Their loop is re-typed from their code, statement for statement, its
     per-sample log included (tests/authors_code.py; their code is not copied into this repository). With
     --authors_repo, their own two functions are read from a checkout of github.com/YoungZ365/SOD and timed as
     well, so the ratio against their function is printed next to the ratio against the re-typing.
  2. The sandbox: a tool call alone and 64 at once, on the warm path and on the cold path; a call alone taking
     turns with a bare interpreter start (`python -I -S -c pass`), the yardstick of docs/sandbox.md.
  3. The tool calls of a turn: 64 at once against one after another.
  4. SFT steps of the toy teacher on its pipeline data (batches of 32): one micro-batch of 32 against the same
     batch sorted by length and cut in two (sft.py --sort_by_length), the two settings taking turns.
Each timing is the best of a few repeats (the authors' loop, slow, runs once at full size). Another job on the
machine slows every number; the ratios of one run are the figures to read.

    python scripts/speed.py                          # the sizes of docs/speed.md
    python scripts/speed.py --authors_repo ../SOD    # also their own step-weight function
    python scripts/speed.py --quick                  # tiny sizes: it runs; the numbers mean nothing
"""
import argparse
import ast
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import numpy as np  # noqa: E402

import rollout  # noqa: E402
import sft  # noqa: E402
import sod_distill  # noqa: E402
import tools  # noqa: E402
from authors_code import retyped_step_weights  # noqa: E402
from common import models, sandbox  # noqa: E402


def best_of(repeats: int, fn) -> tuple[float, object]:
    """(the shortest wall time of `repeats` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# -----------------------------------------------------------------------------
# 1. step weights

def authors_step_weights(repo: str):
    """Their compute_stepwise_opd_weights, read from their file (the two functions only: the module itself
    imports Ray and the rest of verl)."""
    path = Path(repo) / "verl" / "trainer" / "ppo" / "ray_trainer.py"
    if not path.is_file():
        raise SystemExit(f"--authors_repo: no {path} (a checkout of github.com/YoungZ365/SOD is expected)")
    wanted = ("_extract_step_boundaries", "compute_stepwise_opd_weights")
    tree = ast.parse(path.read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["compute_stepwise_opd_weights"]


def random_batch(B: int, T: int, p_switch: float, seed: int = 3):
    """float32 log-probs of a student and a teacher, and a response mask of runs of 1s and 0s."""
    g = torch.Generator().manual_seed(seed)
    flips = torch.rand(B, T, generator=g) < p_switch
    mask = ((torch.cumsum(flips.long(), dim=1) + torch.randint(0, 2, (B, 1), generator=g)) % 2).float()
    return -torch.rand(B, T, generator=g) * 3, -torch.rand(B, T, generator=g) * 3, mask


def bench_step_weights(B: int, T: int, repeats: int, authors_repo: str):
    student, teacher, mask = random_batch(B, T, p_switch=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def ours():
            step_id, d = sod_distill.step_divergence(student, teacher, mask)
            return sod_distill.step_weights(d, step_id, 1e-6, 0.2)
        ours_s, w = best_of(repeats, ours)
        retyped_s, (w_retyped, _) = best_of(1, lambda: retyped_step_weights(student, teacher, mask, 1e-6, 0.2))
        theirs = authors_step_weights(authors_repo) if authors_repo else None
        if theirs is not None:
            theirs_s, (w_theirs, _) = best_of(1, lambda: theirs(student, teacher, mask, 1e-6, 0.2))
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(w.float(), w_retyped, rtol=1e-5, atol=1e-6), "the re-typed loop disagrees"
    line = (f"step weights {B} x {T}, one thread: step_divergence + step_weights {ours_s * 1e3:.1f} ms; "
            f"the re-typed loop {retyped_s:.2f} s ({retyped_s / ours_s:.0f}x)")
    if theirs is not None:
        assert torch.allclose(w.float(), w_theirs, rtol=1e-5, atol=1e-6), "their function disagrees"
        line += f"; the authors' own function {theirs_s:.2f} s ({theirs_s / ours_s:.0f}x)"
    print(line)


# -----------------------------------------------------------------------------
# 2-3. the sandbox and the tool calls of a turn

def calls(codes):
    return [tools.ToolCall(tools.TOOL_NAME, {"code": c}) for c in codes]


def bench_sandbox(alone: int, burst: int, repeats: int):
    if sandbox.sandbox_isolation().level != "full":
        print("sandbox: the warm path needs full isolation (root and unshare); skipped")
        return
    figures, bare = {}, []
    for kind in ("warm", "cold"):
        sandbox.configure(kind=kind)
        tools.execute_code("print(57 * 26)")  # the warm pool starts its first worker
        ones = []
        for _ in range(alone):  # taking turns with a bare interpreter start: a slow spell hits both
            bare.append(best_of(1, lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"]))[0])
            ones.append(best_of(1, lambda: tools.execute_code("print(57 * 26)"))[0])
        batch = calls([f"print(57 * {i})" for i in range(burst)])
        tools.run_tool_calls(batch)  # ... and the rest of its workers on the first burst
        at_once, answers = best_of(repeats, lambda: tools.run_tool_calls(batch))
        assert answers == [f"{57 * i}\n" for i in range(burst)]
        figures[kind] = (statistics.median(ones), at_once)
    (warm_one, warm_burst), (cold_one, cold_burst) = figures["warm"], figures["cold"]
    start = statistics.median(bare)
    print(f"sandbox, a call alone (median): warm {warm_one * 1e3:.1f} ms, cold {cold_one * 1e3:.1f} ms "
          f"({cold_one / warm_one:.1f}x), a bare `python -I -S -c pass` {start * 1e3:.1f} ms (warm "
          f"{warm_one / start:.2f} of it, cold {cold_one / start:.1f}x); "
          f"{burst} at once: warm {warm_burst:.2f} s, cold {cold_burst:.2f} s "
          f"({cold_burst / warm_burst:.1f}x)")


def bench_parallel_calls(n: int, work: int, repeats: int):
    sandbox.configure(kind="warm")
    codes = [f"print(sum(range({work})) + {i})" for i in range(n)]
    tools.run_tool_calls(calls(codes))  # workers started before either timing
    one_by_one, sequential = best_of(repeats, lambda: [tools.execute_code(c) for c in codes])
    together, parallel = best_of(repeats, lambda: tools.run_tool_calls(calls(codes)))
    assert parallel == sequential
    print(f"{n} tool calls of a turn: one after another {one_by_one:.2f} s, at once {together:.2f} s "
          f"({one_by_one / together:.1f}x)")


def bench_sft_sorting(steps: int, repeats: int):
    """sft.py's inner loop on the teacher's data; the same batches either way, so the ratio is padding alone."""
    torch.manual_seed(0)
    cfg = sft.Config(model="toy-teacher", toy_recovery_frac=0.0, toy_direct_frac=0.5)  # pipeline.py's teacher
    tokenizer = models.load_tokenizer(cfg.model)
    examples = sft.load_sft_examples(cfg, tokenizer)
    order = np.random.RandomState(0).permutation(len(examples))
    batches = [[examples[i] for i in order[k * 32:(k + 1) * 32]] for k in range(steps)]
    model = models.load_model(cfg.model, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss(batch, sort: bool):
        """The batch's loss, its gradient accumulated micro-batch by micro-batch."""
        ordered = sorted(batch, key=lambda e: len(e[0]))
        parts = [ordered[:16], ordered[16:]] if sort else [batch]
        tokens, total = sum(sum(m[1:]) for _, m in batch), 0.0
        for part in parts:
            input_ids, attention_mask, label_mask = sft.collate(part, tokenizer.pad_token_id, "cpu")
            logprobs = rollout.token_logprobs(model, input_ids, attention_mask)
            share = sft.micro_batch_loss(logprobs, label_mask, "batch", tokens, len(parts))
            share.backward()
            total += share.item()
        return total

    def run(sort: bool):
        for batch in batches:
            loss(batch, sort)
            optimizer.step()
            optimizer.zero_grad()
    same = [loss(batches[0], sort) for sort in (False, True)]  # the two sides compute the same loss
    optimizer.zero_grad()
    assert abs(same[0] - same[1]) < 1e-5 * abs(same[0]), same
    padded = [sum(max(len(e[0]) for e in part) * len(part) for part in (b[:16], b[16:])) for b in
              [sorted(b, key=lambda e: len(e[0])) for b in batches]]
    print(f"sft batches: {np.mean([len(e[0]) for b in batches for e in b]):.0f} tokens per row, padded to "
          f"{np.mean([max(len(e[0]) for e in b) for b in batches]):.0f} in one micro-batch, "
          f"{np.mean(padded) / 32:.0f} in two sorted ones")
    run(False)  # warm-up
    plain, sorted_ = float("inf"), float("inf")
    for _ in range(repeats):  # taking turns, so a slow spell of the machine hits both
        plain = min(plain, best_of(1, lambda: run(False))[0])
        sorted_ = min(sorted_, best_of(1, lambda: run(True))[0])
    print(f"{steps} SFT steps of the toy teacher: one micro-batch {plain:.2f} s, sorted by length into two "
          f"{sorted_:.2f} s ({plain / sorted_:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every part runs")
    parser.add_argument("--authors_repo", default="", help="a checkout of github.com/YoungZ365/SOD, to time "
                                                           "their own compute_stepwise_opd_weights too")
    args = parser.parse_args()
    if args.quick:
        bench_step_weights(4, 256, 2, args.authors_repo)
        bench_sandbox(alone=2, burst=4, repeats=1)
        bench_parallel_calls(4, 10**3, 1)
        bench_sft_sorting(steps=2, repeats=1)
    else:
        bench_step_weights(64, 8192, 5, args.authors_repo)
        bench_sandbox(alone=20, burst=64, repeats=3)
        bench_parallel_calls(64, 10**6, 1)
        bench_sft_sorting(steps=40, repeats=3)
