"""
common/engines.py: what generates the model's turns for the tool loop (rollout.py), and how new weights reach it.

  - Hugging Face `generate` (the default on a CPU): each request sampled from uniforms of its own seed by the
    exact inverse CDF of softmax(logits / T) with top-p, in float64 (`SampleAtUniforms`), so what a request
    gets does not depend on the batch it lands in, and a token of probability 1e-8 at a 151,936-word
    vocabulary keeps its probability.
  - vLLM (the default on CUDA when installed): colocated in this process, its context the run's prompt +
    response budget, its KV cache checked against --vllm_kv_cache_gb before it starts; new weights pushed in
    place after each update (`push_weights`).
  - The engine protocol the loop drives (`continuous`, `add`, `busy`, `step`): `BatchEngine` runs a batch to
    its end (HF, or any function in tests); `VLLMEngine` takes requests between its steps (continuous
    batching).
  - The batcher (`Waiting`, `serve`): the loop's trajectories post their next turn and wait; the engine gets
    whatever waits once every running trajectory waits for it, or once no request has joined for
    --batch_wait_s while others are still in a tool call.
"""
import asyncio
import itertools
import logging
import math
import os
import time
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from common.dist import Dist, full_state_dict
from common.models import TOY_MODELS, check_model_path

log = logging.getLogger("rollout")


# -----------------------------------------------------------------------------
# Sampling: the exact inverse CDF, seeded per request

def _cut_at_stop(ids: list[int], stop_ids: list[int], budget: int) -> list[int]:
    """A turn ends with the first stop token the model sampled (kept: it is trained on) or at its budget."""
    ids = ids[:budget]
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            return ids[:i + 1]
    return ids


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


# -----------------------------------------------------------------------------
# vLLM, and the weight push

def make_vllm_engine(model_path: str, max_model_len: int, seed: int = 0, d: Dist | None = None,
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


def push_weights(engine, model, d: Dist | None = None):
    """Copy the trainer's current weights into the generation engine: a colocated vLLM engine (no restart, no
    disk), or the plain replica that generates for a sharded model."""
    weights = full_state_dict(model, d or Dist(), everywhere=True)
    if hasattr(engine, "llm_engine"):
        runner = engine.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=iter((k, v.detach()) for k, v in weights.items()))
    else:
        engine.load_state_dict(weights)


# -----------------------------------------------------------------------------
# The engines behind the loop, and the batcher that feeds them

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

    def __init__(self, engine, cfg, stop_ids: list[int], pad_id: int):
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

    def __init__(self, llm, cfg, stop_ids: list[int]):
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


def make_engine(engine, cfg, stop_ids: list[int], pad_id: int):
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


async def serve(engine, waiting: Waiting, cfg):
    """Feed the engine until every trajectory has ended.

    The waiting requests go to the engine once every running trajectory waits for generation (with fast
    tools: all of them, as turn by turn), or once no request has joined for --batch_wait_s while others still
    wait on the tool. An HF batch runs to its end, then the next one is gathered. vLLM's engine also takes
    requests while it runs (by the same rule, checked between its steps) and returns each one as it ends: a
    slow call or a long generation holds its own trajectory only. With --batch_wait_s inf a batch starts only
    when every running trajectory waits for it: every turn waits for the turn's slowest generation and slowest
    tool call (the turn-synchronous loop, to measure against).
    """
    wait_s = None if math.isinf(cfg.batch_wait_s) else cfg.batch_wait_s
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
