"""
rollout.py: the multi-turn tool loop, from prompts and a model to scored trajectories, and the log-probs the
trainers take of them.

Top to bottom:
  1. `RolloutConfig`: the loop's settings, declared once and inherited by every stage that rolls out.
  2. The tool loop, one trajectory at a time (asyncio): each goes generate -> call the tool -> generate at
     its own pace, and the engine batches whatever waits, so nothing waits for the slowest call of a turn
     (--batch_wait_s inf gives the turn-by-turn loop, to measure against). Token-in/token-out:
        response = [turn_1][tool_1][turn_2][tool_2] ... [turn_K]
        response_mask = 1 on tokens the model generated (its closing <|im_end|> included),
                        0 on tool-response tokens.
     Generated ids are appended as they are, never decoded and re-encoded. A "step" (what SOD
     weights) is one assistant turn = one maximal run of response_mask == 1. Each trajectory records a
     `Turn` per assistant turn. Each turn is sampled with a seed of its own (`request_seed`), so what it gets
     does not depend on the batch it lands in.
  3. `token_logprobs`: log p(x_{t+1} | x_<=t) at a temperature, gathered in chunks, so no [B, T, V]
     float32 tensor is ever built (at V = 151,936 and T = 16k that would be 10 GB per sequence).

What generates the turns (Hugging Face generate, the default on a CPU; vLLM, the default on CUDA when
installed; the weight push; the batcher) is common/engines.py. The tool itself (what a call returns, the
rewards) is tools.py; data, models, processes and runs are in common/.

By default (--tool_junction template) the rollout's ids equal the chat template's rendering of the same
conversation, so sft.py trains on exactly the ids the RL stages roll out; --tool_junction reference leaves out
the newline after <|im_end|>, as the authors' rollouts do (docs/deviations.md row 16, and why the real-recipe
commands with the released teacher use it).

The toy default runs on a CPU with nothing downloaded:
    python rollout.py                       # 8 toy prompts x 4 samples with the untrained student
    python rollout.py --model runs/sft-student/final --num_prompts 64 --n_samples 8
    python rollout.py --model Qwen/Qwen3-0.6B --data Open-AgentRL-30K.parquet --backend vllm \\
        --n_samples 16   # GPU
"""
import asyncio
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm import tqdm

import tools
from common import chat_template, data, engines
from common.cli import arg, parse_args
from common.data import as_messages, write_jsonl
from common.models import load_model, load_tokenizer, stop_token_ids
from toy import flaky, task

log = logging.getLogger("rollout")


# -----------------------------------------------------------------------------
# 1. The loop's settings

@dataclass
class RolloutConfig(tools.ToolConfig, tools.SandboxConfig, tools.RewardConfig, flaky.Faults):
    """The multi-turn tool loop: generation and the loop.

    Composed with the tool's, the sandbox's, the reward's and the toy's faults (tools.py, toy/flaky.py), and
    inherited by every stage that rolls out: each flag stays one flag, and --help lists it under its heading."""
    chat_template: str = arg("", "chat template: empty (the model's own), qwen3 (Qwen3's, tool-aware) or a "
                                 ".jinja file; saved with every checkpoint")
    # generation
    backend: str = arg("auto", "generation backend: auto (vllm on CUDA if installed, else hf) | hf | vllm")
    vllm_kv_cache_gb: float = arg(4.0, "vLLM's KV-cache budget in GiB, on a GPU or a CPU")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature "
                                  "(reference 1.0)")
    top_p: float = arg(1.0, "nucleus sampling (reference 1.0 in training, 0.6 in evaluation)")
    # the loop
    batch_wait_s: float = arg(0.5, "waiting requests go to the engine once every running trajectory waits for "
                                   "generation, or once no request has joined for this long (inf: turn by "
                                   "turn, every batch waiting for the slowest tool call)")
    max_turns: int = arg(16, "assistant turns, and tool responses, per trajectory (reference 16)")
    max_response_tokens: int = arg(320, "tokens per trajectory, tool tokens included (reference 20480)")
    max_prompt_tokens: int = arg(512, "prompts longer than this, measured with the chat template, are "
                                      "dropped (reference 2560 in training, 4096 in evaluation)")
    wrapper_choice: str = arg("row", "prompt wrapper of a data file's rows: row (each by its own data_source) "
                                     "| file (every row by the first row's, as the authors' loader; "
                                     "docs/deviations.md row 8)")
    max_tool_calls_per_turn: int = arg(1, "tool calls executed per assistant turn (reference 1: the first)")
    tool_junction: str = arg("template", "the ids between a turn's <|im_end|> and the next tool response: "
                                         "template (the chat template's newline, as SFT data has it) "
                                         "| reference (none, as the authors' rollouts: use it with their "
                                         "released teacher, docs/deviations.md row 16)")

CHOICES = {"backend": ("auto", "hf", "vllm"), "autoprint": ("reference", "expression"),
           "tool_junction": ("template", "reference"), "sandbox": ("warm", "cold"),
           "code_scoring": ("fixed", "reference"), "math_scoring": ("strict", "lenient"),
           "tool_shaping": ("reference", "turns", "none"), "wrapper_choice": ("row", "file"),
           "dedupe_tool_calls": ("auto", "on", "off")}


def check_rollout_settings(cfg):
    """A setting with a fixed set of values, given another one, stops the run before anything starts."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {' | '.join(allowed)}, not {getattr(cfg, name)!r}")


def load_prompts(path: str, n: int | None = None, seed: int = 0, toy_steps: str = "2-4",
                 wrapper_choice: str = "row") -> list[dict]:
    """The prompts a stage rolls out: "toy[:split]" generates a toy split (train, eval, valid) of problems
    needing `toy_steps` dependent calls (toy/task.py); anything else is a data file (common/data.py)."""
    if not path.startswith("toy"):
        return data.load_prompts(path, n, wrapper_choice)
    split = path.split(":")[1] if ":" in path else "train"
    rows = task.rl_rows(n or 256, split=split, seed=seed, steps=task.steps_range(toy_steps))
    return data.load_prompts(path, n, wrapper_choice, rows=rows)


def rollout_settings(cfg, **changes) -> RolloutConfig:
    """The RolloutConfig part of a stage's config (a copy, with `changes` applied)."""
    return RolloutConfig(**{f.name: changes.get(f.name, getattr(cfg, f.name)) for f in fields(RolloutConfig)})


# -----------------------------------------------------------------------------
# 2. The multi-turn tool loop

def request_seed(seed: int, index: int, turn: int) -> int:
    """The sampling seed of one generation request: turn `turn` of trajectory `index` (its place in the global
    batch, the same on one rank or many) of a rollout seeded `seed`. Randomness belongs to the request, not to
    the batch the engine happens to put it in, so no schedule and no batching changes what is sampled (up to
    the float differences that batching itself brings)."""
    return random.Random(f"{seed}:{index}:{turn}").getrandbits(63)


def render_prompt_ids(tokenizer, prompt: str | list[dict], tools_schema: list[dict] | None = None) -> list[int]:
    """The initial context: the prompt's messages (a string is one user message) rendered with the tools
    declared (Qwen3: in the system block), and `<|im_start|>assistant\\n`. `enable_thinking` is not passed,
    as in the reference, so no empty think block is pre-filled."""
    text = tokenizer.apply_chat_template(as_messages(prompt), tools=tools_schema or [tools.TOOL_SCHEMA],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def render_tool_response_ids(tokenizer, outputs: list[str], junction: str = "template") -> list[int]:
    """Tool outputs as the chat template renders `tool` messages, plus the next generation prompt.

    The tool messages are rendered on their own, so whatever the template writes for an empty conversation (a
    default system block: Qwen2.5's "You are Qwen, created by Alibaba Cloud. ...") comes first and is taken
    off, as the authors do (tool_agent_loop.py subtracts the rendering of `[{}]`; nothing, with Qwen3's).
    With junction="template", "\\n" first: the newline that follows the assistant's <|im_end|> in the chat
    template, so a rollout has the template's ids (and SFT's). "reference" leaves it out, as the authors'
    agent loop does (tool_agent_loop.py renders the tool message alone): every turn after the first then
    starts after "<|im_end|><|im_start|>user", a junction the first turn never sees (docs/deviations.md).
    """
    text = tokenizer.apply_chat_template([{"role": "tool", "content": o} for o in outputs],
                                         tokenize=False, add_generation_prompt=True)
    preamble = empty_conversation_text(tokenizer)
    if not text.startswith(preamble):
        raise SystemExit("the chat template renders a tool message without the preamble it renders for an "
                         f"empty conversation ({preamble[:80]!r}...), so the tool segment cannot be cut out of "
                         "it: give the stage a template that renders messages one after another (--chat_template)")
    return tokenizer.encode(("\n" if junction == "template" else "") + text[len(preamble):],
                            add_special_tokens=False)


_PREAMBLES: dict[tuple[int, str], str] = {}


def empty_conversation_text(tokenizer) -> str:
    """What the template renders before any message (the authors' `apply_chat_template([{}])`), once per
    tokenizer and template. A template that cannot render an empty message renders no preamble here."""
    key = (id(tokenizer), str(tokenizer.chat_template))
    if key not in _PREAMBLES:
        try:
            _PREAMBLES[key] = tokenizer.apply_chat_template([{}], tokenize=False, add_generation_prompt=False)
        except Exception:  # jinja2 raises for a template that reads message["role"] strictly
            _PREAMBLES[key] = ""
    return _PREAMBLES[key]


@dataclass
class Turn:
    """What the loop records of one assistant turn (tools.py says what a call returns)."""
    tokens: int                                  # tokens the model generated in this turn
    tool_call: object = None                     # the code it sent (the whole call if it had no `code`)
    tool_status: str | None = None               # "ok" | "error" (tools.tool_call_failed); None: no call
    sandbox_failure: bool | None = None          # the sandbox failed, not the code (the toy's flaky tool)
    tool_output_chars: int | None = None         # characters of tool output shown to the model
    tool_output_truncated: bool | None = None    # the output was cut around the middle

    def record(self) -> dict:
        """As JSON: a turn without a tool call has no tool-output fields."""
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("tool_call", "tool_status")}


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    # [start, end) of each assistant turn in response_ids
    steps: list[tuple[int, int]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)  # one per assistant turn
    num_turns: int = 1       # the reference's count: user prompt + assistant turns + tool responses
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    stop_reason: str = ""
    text: str = ""
    score: float = 0.0
    reward: float = 0.0
    acc: bool = False
    pred: str = ""
    prompt_index: int = 0
    data_source: str = ""
    ground_truth: object = None

    def log_record(self) -> dict:
        return {"prompt_index": self.prompt_index, "reward": self.reward, "acc": self.acc, "pred": self.pred,
                "num_turns": self.num_turns, "num_tool_calls": self.num_tool_calls,
                "stop_reason": self.stop_reason, "response_tokens": len(self.response_ids),
                "turns": [turn.record() for turn in self.turns], "text": self.text}


def _finish(traj: Trajectory, reason: str, cfg: RolloutConfig):
    traj.stop_reason = reason
    traj.response_ids = traj.response_ids[:cfg.max_response_tokens]
    traj.response_mask = traj.response_mask[:cfg.max_response_tokens]
    traj.steps = [(s, min(e, cfg.max_response_tokens)) for s, e in traj.steps if s < cfg.max_response_tokens]


async def run_trajectory(t: Trajectory, index: int, waiting: engines.Waiting, call_tool, tokenizer,
                         cfg: RolloutConfig, seed: int | None, counts: Counter):
    """One trajectory at its own pace: generate a turn, parse it, call the tool, append the tool's answer;
    again until the model answers without a call or a limit is reached."""
    try:
        while True:
            # (per turn) budget = what is left of the trajectory's token budget, as the reference's max_tokens
            budget = cfg.max_response_tokens - len(t.response_ids)
            ids = await waiting.generate(t.prompt_ids + t.response_ids, budget,
                                         None if seed is None else request_seed(seed, index, len(t.steps)), index)
            t.steps.append((len(t.response_ids), len(t.response_ids) + len(ids)))
            t.response_ids += ids
            t.response_mask += [1] * len(ids)
            t.num_turns += 1
            t.turns.append(Turn(tokens=len(ids)))
            assistant_turns = len(t.steps)
            user_turns = t.num_turns - 1 - assistant_turns
            if len(t.response_ids) >= cfg.max_response_tokens:
                return _finish(t, "length", cfg)
            if assistant_turns >= cfg.max_turns or user_turns >= cfg.max_turns:
                return _finish(t, "max_turns", cfg)
            calls = tools.parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False), counts)
            if not calls:
                return _finish(t, "answer", cfg)
            calls = calls[:cfg.max_tool_calls_per_turn]
            first = calls[0]
            t.turns[-1].tool_call = (first.arguments.get("code") if isinstance(first.arguments, dict)
                                     else first._asdict())
            reply = await call_tool(calls, (index, assistant_turns))    # a tools.Reply
            failed = any(tools.tool_call_failed(x) for x in reply.texts)
            t.num_tool_calls += len(calls)
            t.num_tool_errors += int(failed)
            counts["tool_calls"] += len(calls)
            counts["tool_errors"] += int(failed)
            turn = t.turns[-1]
            turn.tool_status = "error" if failed else "ok"
            turn.sandbox_failure = reply.sandbox_failure
            turn.tool_output_chars = sum(map(len, reply.texts))
            turn.tool_output_truncated = "...(truncated)..." in "".join(reply.texts)
            segment = render_tool_response_ids(tokenizer, reply.texts, cfg.tool_junction)
            if len(t.response_ids) + len(segment) >= cfg.max_response_tokens:
                # stop *without* appending: a trajectory always ends with a model turn
                return _finish(t, "length", cfg)
            t.response_ids += segment
            t.response_mask += [0] * len(segment)
            t.num_turns += 1
    finally:
        waiting.finished()


def rollout(engine, tokenizer, prompts: list[data.Prompt], n: int, cfg: RolloutConfig, seed: int | None = None,
            counts: Counter | None = None, progress: bool = False, first_prompt: int = 0) -> list[Trajectory]:
    """n trajectories per prompt, each going generate -> call the tool -> generate at its own pace while the
    engine batches whatever is waiting (`serve`). Sampling follows cfg.temperature and cfg.top_p, with a
    seed per trajectory and turn (`request_seed`). Trajectories of prompt i sit at [i*n, (i+1)*n) (the GRPO
    groups); `first_prompt` is the global index of prompts[0] (a rank's share), so that a trajectory's
    randomness does not depend on how prompts are split between ranks.
    """
    counts = counts if counts is not None else Counter()
    stop_ids, pad_id = stop_token_ids(tokenizer), tokenizer.pad_token_id
    # identical calls share one answer only where the code is known to be deterministic
    dedupe = cfg.dedupe_tool_calls == "on" or (cfg.dedupe_tool_calls == "auto"
                                               and all(p.data_source.startswith("toy") for p in prompts))
    run_tool = tools.tool_runner(cfg, dedupe)  # the tool as cfg sets it up (the sandbox is set up once)
    # the toy's sandbox that fails, or stalls, now and then (--tool_failure_rate, --tool_latency_rate)
    run_tool = flaky.flaky(flaky.slow(run_tool, cfg.tool_latency_rate, cfg.tool_latency_s, seed),
                           cfg.tool_failure_rate, seed)
    trajs = []
    for i, p in enumerate(prompts):
        prompt_ids = render_prompt_ids(tokenizer, p.prompt)
        trajs += [Trajectory(prompt_ids=prompt_ids, prompt_index=first_prompt + i, data_source=p.data_source,
                             ground_truth=p.ground_truth)
                  for _ in range(n)]

    async def roll() -> None:
        loop = asyncio.get_running_loop()
        waiting = engines.Waiting(len(trajs))
        in_flight = {"calls": 0, "since": 0.0}
        bar = tqdm(total=len(trajs), desc="rollout", leave=False, disable=not progress)

        async def call_tool(calls, key) -> tools.Reply:
            # the tool runs in a thread of its own while other trajectories generate; counts["tool_seconds"]
            # is the wall time during which at least one call was running
            if not in_flight["calls"]:
                in_flight["since"] = time.time()
            in_flight["calls"] += 1
            try:
                return await loop.run_in_executor(pool, run_tool, calls, key)
            finally:
                in_flight["calls"] -= 1
                if not in_flight["calls"]:
                    counts["tool_seconds"] += time.time() - in_flight["since"]

        async def one(k: int, t: Trajectory):
            await run_trajectory(t, t.prompt_index * n + k % n, waiting, call_tool, tokenizer, cfg, seed, counts)
            bar.update(1)

        with ThreadPoolExecutor(32) as pool:   # 32 = the reference's num_workers
            feed = engines.serve(engines.make_engine(engine, cfg, stop_ids, pad_id), waiting, cfg)
            await asyncio.gather(feed, *(one(k, t) for k, t in enumerate(trajs)))
        bar.close()

    run_coroutine(roll())
    for t in trajs:
        score_trajectory(t, tokenizer, cfg)
    return trajs


def run_coroutine(coroutine):
    """asyncio.run, also from a thread whose event loop is already running (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


def score_trajectory(t: Trajectory, tokenizer, cfg: RolloutConfig):
    """Reward from the decoded response (tool segments included, special tokens skipped), as the reference."""
    t.text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
    result = tools.compute_score(t.data_source, t.text, t.ground_truth, {"num_turns": t.num_turns},
                                 tool_shaping=cfg.tool_shaping, lenient_math=cfg.math_scoring == "lenient",
                                 code_scoring=cfg.code_scoring)
    t.score, t.acc, t.pred = float(result.score), bool(result.acc), result.pred or ""
    t.reward = t.score + overlong_penalty(len(t.response_ids), cfg.max_response_tokens,
                                          cfg.overlong_buffer, cfg.overlong_penalty)


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO soft overlong penalty: 0 until max_length - buffer, then linear down to -factor."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_length - buffer)) / buffer * factor, 0.0)


# -----------------------------------------------------------------------------
# 3. Batches and log-probs

def pad_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int, device="cpu"):
    """Right-padded [B, T] input_ids and attention_mask, and the per-token masks moved to *label* space
    [B, T-1]: label_mask[b, t] = masks[b][t+1], the mask of the token that position t predicts
    (the layout of token_logprobs). Shared by SFT batches and RL batches."""
    T = max(map(len, seqs))
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    token_mask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
        token_mask[b, :len(m)] = torch.tensor(m, dtype=torch.float32)
    return input_ids.to(device), attention_mask.to(device), token_mask[:, 1:].to(device)


@dataclass
class Batch:
    """An RL batch: [B, T] input_ids and attention_mask (right-padded), and response_mask [B, T-1] in label
    space (1 iff token t+1 is one the model generated). `positions`: each row's place among the step's
    trajectories, where a rank holds only some of them."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    positions: list[int] = field(default_factory=list)


def pad_trajectories(trajs: list[Trajectory], pad_id: int, device="cpu", positions: list[int] | None = None
                     ) -> Batch:
    """The trajectories as one Batch, rows in the order given."""
    input_ids, attention_mask, response_mask = pad_batch(
        [t.prompt_ids + t.response_ids for t in trajs],
        [[0] * len(t.prompt_ids) + t.response_mask for t in trajs], pad_id, device)
    return Batch(input_ids, attention_mask, response_mask, list(range(len(trajs))) if positions is None
                 else positions)


def _chunk_logprobs(lm_head, hidden, labels, temperature, with_entropy=False):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=hidden.is_cuda):
        logits = lm_head(hidden)
    logits = logits.float() / temperature  # [N, V] float32: one chunk only
    log_z = torch.logsumexp(logits, dim=-1)                                                    # [N]
    logprobs = logits.gather(-1, labels[:, None]).squeeze(-1) - log_z
    if not with_entropy:
        return logprobs
    entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = log Z - E_p[logit], [N]
    return logprobs, entropy


def final_hidden_states(model, input_ids, attention_mask):
    """[B, T, H]: the decoder's output after its final norm, taken by a hook during a call of the *whole*
    model that computes logits for one position only. Calling the model itself, not its decoder, is what lets
    FSDP2 gather every parameter the root owns (embeddings, final norm, the tied output head) in a sharded
    run."""
    captured = []
    hook = model.get_decoder().norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[0]


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, chunk_bytes: int = 256 * 2**20,
                   max_chunk_tokens: int = 2048, with_entropy: bool = False):
    """[B, T-1] float32, entry [b, t] = log p_T(input_ids[b, t+1] | input_ids[b, :t+1]) with p_T =
    softmax(logits / T), the distribution the rollout sampled from at temperature T. With `with_entropy`, also
    the entropy of that next-token distribution: a pair of [B, T-1] tensors.

    The body runs once over the whole batch; the vocabulary projection runs on chunks of positions sized so a
    chunk's float32 logits stay under `chunk_bytes` (and at most `max_chunk_tokens` positions, so even a small
    vocabulary never gets logits for a whole batch at once). Under autograd each chunk is checkpointed, so the
    backward pass recomputes its logits instead of keeping all of them alive.
    """
    # greedy decoding samples no distribution: score at T = 1
    temperature = temperature if temperature > 0 else 1.0
    # bf16 autocast on CUDA (fp32 master weights, like the reference's mixed precision); a no-op on CPU
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda):
        hidden = final_hidden_states(model, input_ids, attention_mask)[:, :-1]                  # [B, T-1, H]
    labels = input_ids[:, 1:]                                                                   # [B, T-1]
    B, Tm1, H = hidden.shape
    lm_head = model.get_output_embeddings()
    flat_h, flat_y = hidden.reshape(-1, H), labels.reshape(-1)                                  # [N, H], [N]
    chunk = max(1, min(max_chunk_tokens, chunk_bytes // (4 * lm_head.weight.shape[0])))
    parts = []
    for s in range(0, flat_h.shape[0], chunk):
        h, y = flat_h[s:s + chunk], flat_y[s:s + chunk]
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, lm_head, h, y,
                                                           temperature, with_entropy, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(lm_head, h, y, temperature, with_entropy))
    if with_entropy:  # parts hold (logprobs, entropy) pairs
        return tuple(torch.cat([p[i] for p in parts]).view(B, Tm1) for i in range(2))
    return torch.cat(parts).view(B, Tm1)


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)

# -----------------------------------------------------------------------------
# A small command-line run: rollouts of the toy task, timed

@dataclass
class Args(RolloutConfig):
    """Roll out a model on toy or real prompts with the tool loop, and time it."""
    model: str = arg("toy-student", "local path, Hugging Face name, or toy-student / toy-teacher")
    data: str = arg("toy:eval", "'toy[:split]' (train, eval, valid) or a .jsonl/.parquet file")
    num_prompts: int = arg(8, "prompts to roll out")
    n_samples: int = arg(4, "samples per prompt")
    seed: int = arg(0, "random seed")
    log_file: str = arg("", "optional per-trajectory JSONL")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(Args)
    check_rollout_settings(args)
    tools.setup_sandbox(args, args.data)
    tokenizer = load_tokenizer(args.model, args.chat_template)
    chat_template.check_declares_tool(tokenizer, tools.TOOL_SCHEMA, args.model)
    backend = engines.resolve_backend(args.backend)
    engine = (engines.make_vllm_engine(args.model, args.max_prompt_tokens + args.max_response_tokens,
                                       seed=args.seed, kv_cache_gb=args.vllm_kv_cache_gb)
              if backend == "vllm" else load_model(args.model, seed=args.seed))
    prompts = load_prompts(args.data, args.num_prompts, seed=args.seed, wrapper_choice=args.wrapper_choice)
    counts = Counter()
    t0 = time.time()
    trajs = rollout(engine, tokenizer, prompts, args.n_samples, args, seed=args.seed,
                    counts=counts, progress=True)
    dt = time.time() - t0
    tokens = sum(sum(t.response_mask) for t in trajs)
    print(f"{len(trajs)} trajectories in {dt:.1f}s ({tokens / dt:.0f} generated tokens/s); "
          f"accuracy {sum(t.acc for t in trajs) / len(trajs):.3f}; tool calls {counts['tool_calls']} "
          f"({counts['tool_seconds']:.1f}s in tools), errors {counts['tool_errors']}")
    print("example:\n" + tokenizer.decode(trajs[0].prompt_ids[-20:] + trajs[0].response_ids))
    if args.log_file:
        write_jsonl(args.log_file, [t.log_record() for t in trajs])
