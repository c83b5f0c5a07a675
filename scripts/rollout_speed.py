"""
scripts/rollout_speed.py: the rollout loop batching asynchronously against turn by turn, in one run
(docs/speed.md).

One GRPO step's rollout of the toy (16 prompts x 8 samples, the tool called on every turn, no deduplication:
every call reaches the sandbox), with the asynchronous loop (each trajectory at its own pace) and the
turn-synchronous one (--batch_wait_s inf: every batch waits for every running trajectory), on the same engine
and the same seed, so both sample the same trajectories and meet the same slow calls:
  - with injected latency: one tool call in 50 sleeps 6 s first (--tool_latency_rate 0.02);
  - without: the loop's own cost, when tools are fast.
For each: wall-clock seconds (the best of --repeats rounds, in which the schedules take turns), rollout
accuracy, and the share of trajectories whose token ids are the same under both schedules (batches of other
shapes may round differently). The model should call the tool: the default pipeline's SFT student does.

    python scripts/rollout_speed.py --model runs/sft-student/final                  # HF generate
    python scripts/rollout_speed.py --model runs/sft-student/final --backend vllm   # vLLM's CPU build
    python scripts/rollout_speed.py --quick                                          # it runs; means nothing
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rollout  # noqa: E402
import tools  # noqa: E402
from common import engines, models  # noqa: E402


def timed_rollouts(engine, tokenizer, prompts, n, cfgs, seed, repeats):
    """Best wall time of each config over `repeats` rounds, the configs taking turns within each round (so a
    drift of the machine's speed, or a warm-up, does not favour the one measured second)."""
    best, trajs = {k: float("inf") for k in cfgs}, {}
    for r in range(repeats):
        for k in (list(cfgs) if r % 2 == 0 else list(cfgs)[::-1]):
            t0 = time.perf_counter()
            trajs[k] = rollout.rollout(engine, tokenizer, prompts, n, cfgs[k], seed=seed)
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: (best[k], trajs[k]) for k in cfgs}


def main(args):
    tools.setup_sandbox(rollout.RolloutConfig(), "toy")
    tokenizer = models.load_tokenizer(args.model)
    budget = rollout.RolloutConfig().max_prompt_tokens + rollout.RolloutConfig().max_response_tokens
    engine = (engines.make_vllm_engine(args.model, budget, seed=0, kv_cache_gb=1) if args.backend == "vllm"
              else models.load_model(args.model, device="cpu"))
    prompts = rollout.load_prompts("toy:valid", args.prompts, seed=0)
    print("| backend | tool latency | turn by turn (s) | asynchronous (s) | speed-up | accuracy, sync / async "
          "| same ids |\n|---|---|---|---|---|---|---|")
    for rate in (args.latency_rate, 0.0):
        cfgs = {schedule: rollout.RolloutConfig(batch_wait_s=wait_s, dedupe_tool_calls="off",
                                                tool_latency_rate=rate, tool_latency_s=args.latency_s,
                                                max_response_tokens=320)
                for schedule, wait_s in (("sync", float("inf")), ("async", rollout.RolloutConfig.batch_wait_s))}
        for cfg in cfgs.values():
            rollout.rollout(engine, tokenizer, prompts[:2], 2, cfg, seed=1)   # warm the engine and the sandbox
        row = timed_rollouts(engine, tokenizer, prompts, args.n, cfgs, args.seed, args.repeats)
        (t_sync, sync), (t_async, asyn) = row["sync"], row["async"]
        same = sum(a.response_ids == b.response_ids for a, b in zip(sync, asyn)) / len(sync)
        acc = [sum(t.acc for t in trajs) / len(trajs) for trajs in (sync, asyn)]
        latency = f"1 call in {round(1 / rate)} sleeps {args.latency_s:g} s" if rate else "none"
        print(f"| {args.backend} | {latency} | {t_sync:.1f} | {t_async:.1f} | {t_sync / t_async:.2f}x "
              f"| {acc[0]:.3f} / {acc[1]:.3f} | {same:.0%} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/sft-student/final", help="a checkpoint that calls the tool")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--latency_rate", type=float, default=0.02)
    parser.add_argument("--latency_s", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each schedule's best is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every part runs")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.n, args.latency_s, args.repeats = 2, 2, 0.2, 1
        args.latency_rate = max(args.latency_rate, 0.25)
    main(args)
