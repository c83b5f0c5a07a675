"""
rollout.py: the multi-turn tool loop, from prompts and a model to scored trajectories, and the log-probs the
trainers take of them.

Top to bottom:
  1. `RolloutConfig`: the loop's settings, declared once and inherited by every stage that rolls out.
  2. Generation: Hugging Face `generate` (default on CPU) and vLLM (default on CUDA when installed),
     colocated in-process, with new weights pushed after each update. Each request is sampled with a seed of
     its own, so what it gets does not depend on the batch it lands in.
  3. The tool loop, one trajectory at a time (asyncio): each goes generate -> call the tool -> generate at
     its own pace, and the engine batches whatever waits, so nothing waits for the slowest call of a turn
     (--rollout_schedule sync keeps the turn-by-turn loop, to measure against). Token-in/token-out:
        response = [turn_1][tool_1][turn_2][tool_2] ... [turn_K]
        response_mask = 1 on tokens the model generated (its closing <|im_end|> included),
                        0 on tool-response tokens.
     Generated ids are appended as they are, never decoded and re-encoded. A "step" (what SOD
     weights) is one assistant turn = one maximal run of response_mask == 1. Each trajectory records a
     `Turn` per assistant turn.
  4. `token_logprobs`: log p(x_{t+1} | x_<=t) at a temperature, gathered in chunks, so no [B, T, V]
     float32 tensor is ever built (at V = 151,936 and T = 16k that would be 10 GB per sequence).

The tool itself (what a call returns, the rewards) is tools.py; data, models, processes and runs are in
common/.

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
import itertools
import logging
import os
import random
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import tools
from common import chat_template, sandbox
from common.cli import arg, parse_args, reject_unused
from common.data import as_messages, load_prompts, write_jsonl
from common.dist import Dist, full_state_dict
from common.models import TOY_MODELS, check_model_path, load_model, load_tokenizer, stop_token_ids

log = logging.getLogger("rollout")


# -----------------------------------------------------------------------------
# 1. The loop's settings

@dataclass
class RolloutConfig:
    """The multi-turn tool loop's settings: one declaration, inherited by every stage that rolls out."""
    chat_template: str = arg("", "chat template: empty (the model's own), qwen3 (Qwen3's, tool-aware) or a "
                                 ".jinja file; saved with every checkpoint")
    # generation
    backend: str = arg("auto", "generation backend: auto (vllm on CUDA if installed, else hf) | hf | vllm")
    vllm_kv_cache_gb: float = arg(4.0, "vLLM's KV-cache budget in GiB, on a GPU or a CPU")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature "
                                  "(reference 1.0)")
    top_p: float = arg(1.0, "nucleus sampling (reference 1.0 in training, 0.6 in evaluation)")
    # the loop
    rollout_schedule: str = arg("async", "async: each trajectory at its own pace, the engine batching whatever "
                                         "waits (as the authors' agent loop) | sync: turn by turn, each turn "
                                         "waiting for its slowest call (to measure against)")
    batch_wait_s: float = arg(0.5, "async: waiting requests go to the engine once every running trajectory "
                                   "waits for generation, or once no request has joined for this long")
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
    # the tool
    sandbox: str = arg("warm", "local sandbox: warm (forked from pooled interpreters) | cold (one per call)")
    sandbox_url: str = arg("", "a SandboxFusion server for tool calls and code tests, not the local sandbox")
    sandbox_python: str = arg("", "interpreter of the local sandbox, its environment mounted read-only inside "
                                  "(empty: $SOD_SANDBOX_PYTHON, else the trainer's own)")
    sandbox_stdlib_ok: bool = arg(False, "run on real data even if the sandbox's Python cannot import numpy or "
                                         "sympy, which SandboxFusion's image has")
    tool_timeout: float = arg(60.0, "seconds per tool call, also the cap on a call's own `timeout` "
                                    "(reference 60)")
    tool_memory_mb: int = arg(2048, "memory per tool call in MB (reference 2048)")
    max_tool_response_chars: int = arg(256, "tool output shown to the model, cut around the middle "
                                            "(reference 256)")
    autoprint: str = arg("reference", "tool auto-print of the last line: reference (any line) | expression "
                                      "(bare expressions only)")
    dedupe_tool_calls: str = arg("auto", "identical calls of a rollout run once: auto (on for the toy's "
                                         "arithmetic, off for other data, whose code may be random: the authors "
                                         "run each call) | on | off")
    tool_failure_rate: float = arg(0.0, "fraction of tool calls that fail transiently ('no stdout here'), "
                                        "a toy option")
    tool_latency_rate: float = arg(0.0, "fraction of tool calls that first sleep --tool_latency_s (a toy option, "
                                        "to measure how rollouts wait on slow calls)")
    tool_latency_s: float = arg(6.0, "seconds a slow tool call sleeps (with --tool_latency_rate)")
    # the reward
    math_scoring: str = arg("strict", "math and GPQA answers: strict (the reference's exact last box) "
                                      "| lenient (math-verify's symbolic equivalence)")
    code_scoring: str = arg("fixed", "code problems: fixed | reference (their </think> split, newline unescaping, "
                                     "test reading and class Solution wrapping; docs/deviations.md)")
    tool_shaping: str = arg("reference", "wrong-answer shaping: reference (-1.1) "
                                         "| turns (+0.1 per tool round) | none")
    overlong_buffer: int = arg(0, "DAPO overlong penalty buffer in tokens, 0 = off (reference 1024)")
    overlong_penalty: float = arg(1.0, "DAPO overlong penalty factor (reference 1.0)")


CHOICES = {"backend": ("auto", "hf", "vllm"), "autoprint": ("reference", "expression"),
           "tool_junction": ("template", "reference"), "sandbox": ("warm", "cold"),
           "code_scoring": ("fixed", "reference"), "math_scoring": ("strict", "lenient"),
           "tool_shaping": ("reference", "turns", "none"), "wrapper_choice": ("row", "file"),
           "dedupe_tool_calls": ("auto", "on", "off"), "rollout_schedule": ("async", "sync")}


def check_rollout_settings(cfg):
    """A setting with a fixed set of values, given another one, stops the run before anything starts."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {' | '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.sandbox_python and not shutil.which(cfg.sandbox_python):
        raise SystemExit(f"--sandbox_python {cfg.sandbox_python!r} is not an executable")


def setup_sandbox(cfg, *data: str):
    """The sandbox of this process's tool calls and code tests, set up once at a stage's start. On real data
    (anything but the toy, which needs the standard library alone) the model's code expects the packages of
    SandboxFusion's image: a local sandbox whose Python cannot import numpy or sympy stops the run here."""
    if cfg.sandbox_url:
        reject_unused(cfg, ["sandbox_python", "sandbox_stdlib_ok"], "with --sandbox_url (its image decides)")
    sandbox.configure(cfg.sandbox, cfg.sandbox_url, python=cfg.sandbox_python)
    if cfg.sandbox_stdlib_ok or all(d.startswith("toy") for d in data):
        return
    missing = sandbox.missing_packages(("numpy", "sympy"))
    if missing:
        isolation = sandbox.sandbox_isolation()
        raise SystemExit(
            f"the sandbox runs {isolation.python} (isolation {isolation.level}), which cannot import "
            f"{' and '.join(missing)}; tool calls on real data expect them (SandboxFusion's image has them). "
            f"Install them into that environment ({isolation.python} -m pip install numpy sympy), point "
            "--sandbox_python at an environment that has them, or use a SandboxFusion server (--sandbox_url); "
            "--sandbox_stdlib_ok runs without them.")


def rollout_settings(cfg, **changes) -> RolloutConfig:
    """The RolloutConfig part of a stage's config (a copy, with `changes` applied)."""
    return RolloutConfig(**{f.name: changes.get(f.name, getattr(cfg, f.name)) for f in fields(RolloutConfig)})


# -----------------------------------------------------------------------------
# 2. Generation: Hugging Face generate (CPU default) and vLLM (GPU default)

def _cut_at_stop(ids: list[int], stop_ids: list[int], budget: int) -> list[int]:
    """A turn ends with the first stop token the model sampled (kept: it is trained on) or at its budget."""
    ids = ids[:budget]
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            return ids[:i + 1]
    return ids


def request_seed(seed: int, index: int, turn: int) -> int:
    """The sampling seed of one generation request: turn `turn` of trajectory `index` (its place in the global
    batch, the same on one rank or many) of a rollout seeded `seed`. Randomness belongs to the request, not to
    the batch the engine happens to put it in, so no schedule and no batching changes what is sampled (up to
    the float differences that batching itself brings)."""
    return random.Random(f"{seed}:{index}:{turn}").getrandbits(63)


def sampling_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] float64: softmax(logits / T) restricted to the top-p nucleus and renormalised, the distribution
    a turn is sampled from. The nucleus is the smallest set of most likely tokens whose mass reaches top_p: a
    token is kept when the tokens ranked above it hold less than top_p (the rule of HF's and vLLM's top-p).
    float64 because at V = 151,936 a float32 sum of the vocabulary cannot hold a token of probability 1e-8
    once the mode has been added (float32's spacing near 1 is 6e-8)."""
    p = torch.softmax(logits.double() / temperature, dim=-1)                          # [B, V]
    if top_p < 1:
        sorted_p, order = p.sort(dim=-1, descending=True)
        above = sorted_p.cumsum(-1) - sorted_p                                        # mass ranked above each
        p = torch.zeros_like(p).scatter_(-1, order, sorted_p * (above < top_p))
        p = p / p.sum(-1, keepdim=True)
    return p


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] token ids: row b's token is the first (in id order) whose cumulative probability exceeds
    u[b] * total. The comparison is strict, so a token of probability 0 is never picked, not even at u = 0."""
    cdf = p.cumsum(-1)                                                                 # [B, V] float64
    token = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    last = p.shape[-1] - 1 - (p.flip(-1) > 0).int().argmax(-1)                         # last id with p > 0
    return torch.minimum(token, last)                          # u * total rounded up to the total: the last one


def request_uniforms(seed: int, n: int) -> torch.Tensor:
    """[n] float64 uniforms in [0, 1) of one request, from a generator of its own. A float32 uniform holds 24
    bits, so each token would get a multiple of 2^-24 = 6e-8 of probability, far from a token of 1e-8 at a real
    vocabulary: a second draw fills the next 24 bits (48 in all, 3.6e-15). The first draw alone decides the
    token unless a CDF boundary falls inside its 2^-24 bucket."""
    coarse = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    fine = torch.rand(n, generator=torch.Generator().manual_seed(seed ^ 0x5EED))
    return coarse.double() + fine.double() * 2.0 ** -24


class SampleAtUniforms(LogitsProcessor):
    """Sampling whose randomness belongs to each request. Request r comes with u_r, uniforms drawn from a
    generator seeded by its own seed; its j-th token is the inverse CDF of the temperature / top-p
    distribution at u_r[j]. Handed to greedy `generate`, it leaves one finite score per row: the sample."""

    def __init__(self, uniforms: torch.Tensor, start: int, temperature: float, top_p: float,
                 rows_at_once: int = 16):
        self.u, self.start = uniforms, start                           # u: [B, max new tokens]
        self.temperature, self.top_p, self.rows = temperature, top_p, rows_at_once

    def __call__(self, input_ids, scores):                            # scores: [B, V]
        u = self.u[:, input_ids.shape[1] - self.start]                # [B]
        # a few rows at a time: the float64 [rows, V] temporaries stay small at a real vocabulary
        token = torch.cat([inverse_cdf(sampling_distribution(scores[s:s + self.rows], self.temperature,
                                                             self.top_p), u[s:s + self.rows])
                           for s in range(0, scores.shape[0], self.rows)])
        return torch.full_like(scores, float("-inf")).scatter_(1, token.unsqueeze(-1), 0.0)


@torch.inference_mode()  # as no_grad, and lighter per op: these tensors never meet autograd
def generate_hf(model, contexts: list[list[int]], max_new_tokens: list[int], temperature: float, top_p: float,
                stop_ids: list[int], pad_id: int, seeds: list[int] | None = None,
                batch_size: int = 256) -> list[list[int]]:
    """Sample one continuation per context, each cut after its first stop token and to its own budget. With
    `seeds` (one per context), context i is sampled from its own generator seeded by seeds[i]; without,
    from torch's global generator. Either way the draw is `SampleAtUniforms`: the exact inverse CDF of
    softmax(logits / T) with top-p, in float64 (temperature <= 0: greedy)."""
    device = next(model.parameters()).device
    # similar lengths together: less padding
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    outputs: list[list[int]] = [[] for _ in contexts]
    greedy = temperature <= 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(contexts[i]) for i in idx)
        longest = max(max_new_tokens[i] for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: generation continues from the right edge
            input_ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
            attention_mask[row, width - len(contexts[i]):] = 1
        sampling = {}
        if not greedy:  # greedy `generate` with one finite score per row: the sample of SampleAtUniforms
            uniforms = (torch.stack([request_uniforms(seeds[i], longest) for i in idx]) if seeds is not None
                        else torch.rand(len(idx), longest, dtype=torch.float64))         # [B, longest]
            sampling = dict(logits_processor=LogitsProcessorList(
                [SampleAtUniforms(uniforms.to(device), width, temperature, top_p)]))
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=longest, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=stop_ids, pad_token_id=pad_id, **sampling)
        new_tokens = out[:, width:].tolist()
        for row, i in enumerate(idx):
            outputs[i] = _cut_at_stop(new_tokens[row], stop_ids, max_new_tokens[i])
    return outputs


def make_vllm_engine(model_path: str, max_model_len: int, seed: int = 0, d: "Dist | None" = None,
                     kv_cache_gb: float = 4.0):
    """A colocated, in-process vLLM engine (in-process is what lets us push weights without a disk round
    trip), with an explicit KV-cache budget in GiB, on a GPU or a CPU. Under torchrun every rank holds its own
    engine (vLLM's external launcher, data parallel: each rank generates for its own prompts).

    `max_model_len` is the run's prompt + response budget, as the authors set it (verl's vllm_async_server:
    prompt_length + response_length = 2,560 + 20,480). Without it vLLM sizes the context from the model's own
    (Qwen3: 40,960 positions) and refuses to start when one sequence of that length does not fit the KV
    budget; here a budget too small for one sequence of the run stops first, with the sizes."""
    check_model_path(model_path)
    if model_path in TOY_MODELS:
        raise SystemExit(f"vLLM loads weights from a folder; {model_path!r} is a random toy model: "
                         "run sft.py first")
    on_gpu = torch.cuda.is_available()
    check_kv_budget(model_path, max_model_len, kv_cache_gb, dtype_bytes=2 if on_gpu else 4)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's CPU backend lets this legacy variable override kv_cache_memory_bytes: the flag wins
    inherited = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if inherited:
        log.warning("VLLM_CPU_KVCACHE_SPACE=%s from the environment is ignored: the KV cache gets "
                    "--vllm_kv_cache_gb %g GiB", inherited, kv_cache_gb)
    try:
        from vllm import LLM
    except ImportError as e:
        raise SystemExit("--backend vllm needs vLLM (pip install vllm; "
                         "on CPU: pip install -r requirements-vllm.txt)") from e
    kwargs = dict(model=model_path, seed=seed, dtype="bfloat16" if on_gpu else "float32",
                  enforce_eager=not on_gpu, enable_prefix_caching=True, max_model_len=max_model_len,
                  kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
    if not on_gpu:
        # vLLM rewinds a seeded request's generator when it discards the token of a chunked prefill, which a CPU
        # generator cannot do ("CPU Generator does not use offset"): on a CPU, prefills are never chunked
        kwargs["enable_chunked_prefill"] = False
    if d is not None and d.world > 1:
        kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=d.world)
    log.info("vLLM engine: max_model_len %d, KV cache %g GiB", max_model_len, kv_cache_gb)
    return LLM(**kwargs)


def check_kv_budget(model_path: str, max_model_len: int, kv_cache_gb: float, dtype_bytes: int,
                    block: int = 128):
    """Stop unless the KV cache of one sequence of max_model_len tokens fits --vllm_kv_cache_gb:
    layers x KV heads x head_dim x 2 (K and V) x bytes, per token, the length rounded up to whole blocks of
    `block` tokens (vLLM's CPU block; a GPU's is smaller)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        log.warning("%s: no num_hidden_layers / num_attention_heads in its config; the KV budget is left to "
                    "vLLM to check", model_path)
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = layers * kv_heads * head_dim * 2 * dtype_bytes
    blocks = -(-max_model_len // block)
    # a sliding-window layer keeps at most its window (Gemma, Mistral-style configs); Qwen3's are all full
    window = getattr(config, "sliding_window", None)
    sliding = sum(t == "sliding_attention" for t in (getattr(config, "layer_types", None) or []))
    per_layer = per_token // layers * block                               # one block of one layer
    held = blocks if not (window and sliding) else min(blocks, -(-window // block) + 1)
    need = ((layers - sliding) * blocks + sliding * held) * per_layer
    if need > kv_cache_gb * 2**30:
        raise SystemExit(
            f"{model_path}: one sequence of max_model_len {max_model_len} tokens (the run's prompt + response "
            f"budget) needs {need / 2**30:.2f} GiB of KV cache ({layers} layers x {kv_heads} KV heads x "
            f"{head_dim} x 2 x {dtype_bytes} bytes = {per_token / 2**10:.0f} KiB per token), more than "
            f"--vllm_kv_cache_gb {kv_cache_gb:g}: raise --vllm_kv_cache_gb to at least "
            f"{need / 2**30:.2f}, or lower --max_prompt_tokens / --max_response_tokens")


def push_weights(engine, model, d: "Dist | None" = None):
    """Copy the trainer's current weights into the generation engine: a colocated vLLM engine (no restart, no
    disk), or the plain replica that generates for a sharded model."""
    weights = full_state_dict(model, d or Dist(), everywhere=True)
    if hasattr(engine, "llm_engine"):
        runner = engine.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=iter((k, v.detach()) for k, v in weights.items()))
    else:
        engine.load_state_dict(weights)


class Request(NamedTuple):
    """One turn to generate: the trajectory's context, what is left of its token budget, its sampling seed."""
    context: list[int]
    budget: int
    seed: int | None
    future: asyncio.Future   # receives the turn's token ids
    index: int = 0           # the trajectory's: a batch holds its rows in this order, whatever came first


class BatchEngine:
    """An engine that runs a batch to its end: HF `generate` or, in tests, any function
    (contexts, max_new_tokens, cfg, seeds) -> continuations, where seeds is None for requests without one.
    A request that arrives while it runs waits for the next batch."""
    continuous = False

    def __init__(self, engine, cfg: RolloutConfig, stop_ids: list[int], pad_id: int):
        self.engine, self.cfg, self.stop_ids, self.pad_id = engine, cfg, stop_ids, pad_id
        self.queued: list[Request] = []

    def add(self, requests: list[Request]):
        self.queued += requests

    def busy(self) -> bool:
        return bool(self.queued)

    def step(self) -> list[tuple[asyncio.Future, list[int]]]:
        batch, self.queued = self.queued, []
        contexts, budgets, seeds = [r.context for r in batch], [r.budget for r in batch], [r.seed for r in batch]
        seeds = None if None in seeds else seeds
        if isinstance(self.engine, torch.nn.Module):
            outs = generate_hf(self.engine, contexts, budgets, self.cfg.temperature, self.cfg.top_p,
                               self.stop_ids, self.pad_id, seeds=seeds)
        else:
            outs = self.engine(contexts, budgets, self.cfg, seeds)
        return [(r.future, ids) for r, ids in zip(batch, outs)]


class VLLMEngine:
    """vLLM's own engine, stepped from here: a request added between two steps joins the running batch at
    the next one (continuous batching), and each request comes back as soon as it ends. vLLM keeps the stop
    token it sampled in token_ids; nothing is appended that the model did not sample."""
    continuous = True

    def __init__(self, llm, cfg: RolloutConfig, stop_ids: list[int]):
        self.engine, self.cfg, self.stop_ids = llm.llm_engine, cfg, stop_ids
        self.running: dict[str, Request] = {}

    def add(self, requests: list[Request]):
        from vllm import SamplingParams
        for r in requests:
            request_id = f"sod-{next(_REQUEST_IDS)}"
            self.engine.add_request(request_id, {"prompt_token_ids": r.context}, SamplingParams(
                temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=max(1, r.budget),
                stop_token_ids=list(self.stop_ids), seed=r.seed))
            self.running[request_id] = r

    def busy(self) -> bool:
        return bool(self.running)

    def step(self) -> list[tuple[asyncio.Future, list[int]]]:
        done = []
        for out in self.engine.step():
            if out.finished:
                r = self.running.pop(out.request_id)
                done.append((r.future, _cut_at_stop(list(out.outputs[0].token_ids), self.stop_ids, r.budget)))
        return done


_REQUEST_IDS = itertools.count()


def make_engine(engine, cfg: RolloutConfig, stop_ids: list[int], pad_id: int):
    """The engine behind the loop: `engine` is a vLLM `LLM`, an HF model, a function (tests), or already an
    engine of this protocol (`continuous`, `add`, `busy`, `step`), e.g. another inference server's."""
    if hasattr(engine, "continuous"):
        return engine
    if hasattr(engine, "llm_engine"):
        return VLLMEngine(engine, cfg, stop_ids)
    return BatchEngine(engine, cfg, stop_ids, pad_id)


def resolve_backend(backend: str) -> str:
    """auto: vLLM on a GPU when it is installed, Hugging Face generate otherwise (and always on a CPU)."""
    if backend not in ("auto", "hf", "vllm"):
        raise SystemExit(f"--backend must be auto, hf or vllm, not {backend!r}")
    if backend != "auto":
        return backend
    if not torch.cuda.is_available():
        return "hf"
    import importlib.util
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


# -----------------------------------------------------------------------------
# 3. The multi-turn tool loop

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


class Waiting:
    """The generation requests waiting for the engine, and how many trajectories are still running."""

    def __init__(self, running: int):
        self.requests: list[Request] = []
        self.running = running
        self.changed = asyncio.Event()
        self.last_join = time.monotonic()

    async def generate(self, context: list[int], budget: int, seed: int | None, index: int) -> list[int]:
        future = asyncio.get_running_loop().create_future()
        self.requests.append(Request(context, budget, seed, future, index))
        self.last_join = time.monotonic()
        self.changed.set()
        return await future

    def finished(self):
        self.running -= 1
        self.changed.set()

    async def gather(self, wait_s: float | None):
        """Until every running trajectory waits for generation, or, given wait_s, until no request has joined
        for wait_s seconds while some wait (0: at once)."""
        while len(self.requests) < self.running:
            self.changed.clear()
            if self.requests and wait_s is not None:
                try:
                    await asyncio.wait_for(self.changed.wait(), wait_s)
                except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                    return
            else:
                await self.changed.wait()

    def quiet(self, wait_s: float | None) -> bool:
        """Some requests wait and, given wait_s, none has joined for wait_s seconds."""
        return bool(self.requests) and wait_s is not None and time.monotonic() - self.last_join >= wait_s

    def take(self) -> list[Request]:
        """The waiting requests in trajectory order: the tool calls end in any order, and a batch's rows
        should not depend on it (a row's floats can depend on where it sits in a matrix product)."""
        requests, self.requests = sorted(self.requests, key=lambda r: r.index), []
        return requests


async def serve(engine, waiting: Waiting, cfg: RolloutConfig):
    """Feed the engine until every trajectory has ended.

    async: the waiting requests go to the engine once every running trajectory waits for generation (with
    fast tools: all of them, as turn by turn), or once no request has joined for --batch_wait_s while
    others still wait on the tool. An HF batch runs to its end, then the next one is gathered. vLLM's
    engine also takes requests while it runs (by the same rule, checked between its steps) and returns each
    one as it ends: a slow call or a long generation holds its own trajectory only.
    sync: a batch starts only when every running trajectory waits for it, so every turn waits for the
    turn's slowest generation and slowest tool call (the turn-synchronous loop, kept to measure against).
    """
    wait_s = None if cfg.rollout_schedule == "sync" else cfg.batch_wait_s
    while waiting.running:
        if not engine.busy():
            await waiting.gather(wait_s)
            engine.add(waiting.take())
        elif engine.continuous and waiting.quiet(wait_s):
            engine.add(waiting.take())
        if engine.busy():
            for future, ids in engine.step():  # blocks this thread; the tool calls go on in theirs
                future.set_result(ids)
        await asyncio.sleep(0)                 # the trajectories whose turn came back move on


async def run_trajectory(t: Trajectory, index: int, waiting: Waiting, call_tool, tokenizer, cfg: RolloutConfig,
                         seed: int | None, counts: Counter):
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
            t.turns[-1].tool_call = (first["arguments"].get("code") if isinstance(first["arguments"], dict)
                                     else first)
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


def rollout(engine, tokenizer, prompts: list[dict], n: int, cfg: RolloutConfig, seed: int | None = None,
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
                                               and all(p["data_source"].startswith("toy") for p in prompts))
    run_tool = tools.tool_runner(cfg, seed, dedupe)  # the tool as cfg sets it up (the sandbox is set up once)
    trajs = []
    for i, p in enumerate(prompts):
        prompt_ids = render_prompt_ids(tokenizer, p["prompt"])
        trajs += [Trajectory(prompt_ids=prompt_ids, prompt_index=first_prompt + i, data_source=p["data_source"],
                             ground_truth=p["ground_truth"])
                  for _ in range(n)]

    async def roll() -> None:
        loop = asyncio.get_running_loop()
        waiting = Waiting(len(trajs))
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
            await asyncio.gather(serve(make_engine(engine, cfg, stop_ids, pad_id), waiting, cfg),
                                 *(one(k, t) for k, t in enumerate(trajs)))
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
    t.score, t.acc, t.pred = float(result["score"]), bool(result["acc"]), result["pred"] or ""
    t.reward = t.score + overlong_penalty(len(t.response_ids), cfg.max_response_tokens,
                                          cfg.overlong_buffer, cfg.overlong_penalty)


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO soft overlong penalty: 0 until max_length - buffer, then linear down to -factor."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_length - buffer)) / buffer * factor, 0.0)


# -----------------------------------------------------------------------------
# 4. Batches and log-probs

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


def pad_trajectories(trajs: list[Trajectory], pad_id: int, device="cpu") -> dict:
    """An RL batch: response_mask[b, t] = 1 iff token t+1 is a model-generated response token."""
    input_ids, attention_mask, response_mask = pad_batch(
        [t.prompt_ids + t.response_ids for t in trajs],
        [[0] * len(t.prompt_ids) + t.response_mask for t in trajs], pad_id, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


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
    setup_sandbox(args, args.data)
    tokenizer = load_tokenizer(args.model, args.chat_template)
    chat_template.check_declares_tool(tokenizer, tools.TOOL_SCHEMA, args.model)
    backend = resolve_backend(args.backend)
    engine = (make_vllm_engine(args.model, args.max_prompt_tokens + args.max_response_tokens, seed=args.seed,
                               kv_cache_gb=args.vllm_kv_cache_gb)
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
