"""
rollout.py: what every stage shares, from a data file and a checkpoint to scored trajectories and back.

Top to bottom:
  1. Settings. `arg` and `parse_args` turn each stage's config dataclass into command-line flags;
     `RolloutConfig` declares the tool loop's settings once, and every stage that rolls out inherits it.
  2. Data. The reference's prompt wrappers (chosen per row from `data_source`) and loaders for
     JSONL/parquet files (the toy task lives in toy/task.py).
  3. Models and checkpoints. A tokenizer and a Qwen3 model from a local path, a Hugging Face name, or
     the tiny built-in configs ("toy-student", "toy-teacher"); a check that teacher and student share
     one tokenizer; atomic checkpoints and the RNG state that makes a resumed run exact.
  4. Generation backends behind one function: Hugging Face `generate` (default on CPU) and vLLM
     (default on CUDA when installed), colocated in-process, with new weights pushed after each update.
  5. The tool loop (token-in/token-out):
        response = [turn_1][tool_1][turn_2][tool_2] ... [turn_K]
        response_mask = 1 on tokens the model generated (its closing <|im_end|> included),
                        0 on tool-response tokens.
     Generated ids are appended as they are, never decoded and re-encoded. A "step" (what SOD
     weights) is one assistant turn = one maximal run of response_mask == 1.
  6. `token_logprobs`: log p(x_{t+1} | x_<=t) at a temperature, gathered in chunks, so no [B, T, V]
     float32 tensor is ever built (at V = 151,936 and T = 16k that would be 10 GB per sequence).

The rollout's ids equal the chat template's rendering of the same conversation (README, deviations:
the newline after <|im_end|>), so sft.py trains on exactly the ids the RL stages roll out.

The toy default runs on a CPU with nothing downloaded:
    python rollout.py                       # 8 toy prompts x 4 samples with the untrained student
    python rollout.py --model runs/sft-student/final --num_prompts 64 --n 8
    python rollout.py --model Qwen/Qwen3-0.6B --data Open-AgentRL-30K.parquet --backend vllm --n 16   # GPU
"""
import argparse
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import tools

log = logging.getLogger("rollout")
REPO_DIR = Path(__file__).resolve().parent
TOY_DIR = REPO_DIR / "toy"
TOY_MODELS = {"toy-student": TOY_DIR / "student_config.json", "toy-teacher": TOY_DIR / "teacher_config.json"}


# -----------------------------------------------------------------------------
# 1. Settings: config dataclasses as command-line flags

def arg(default, help: str):
    """A config field with its command-line help string (every stage's config is a dataclass of these)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_bool(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value[text.lower()]


def parse_args(cls, argv=None):
    """Dataclass -> argparse flags, one per field. A bool is `--flag`, `--no-flag` or `--flag true|false`."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip())
    for f in fields(cls):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help strings with %
        if default != "" and "default" not in text:
            text += f" (default: {default})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", nargs="?", const=True, default=default, type=parse_bool,
                                metavar="true|false", help=text)
            parser.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif isinstance(default, list):
            parser.add_argument(f"--{f.name}", nargs="+", default=default, help=text)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default, help=text)
    return cls(**vars(parser.parse_args(argv)))


def reject_unused(cfg, names: list[str], why: str):
    """A flag that is accepted and ignored is a bug: refuse the ones that `why` makes meaningless."""
    for name in names:
        if getattr(cfg, name) != getattr(type(cfg), name):
            raise SystemExit(f"--{name} is not used {why}")


@dataclass
class RolloutConfig:
    """The multi-turn tool loop's settings: one declaration, inherited by every stage that rolls out."""
    # generation
    backend: str = arg("auto", "generation backend: auto (vllm on CUDA if installed, else hf) | hf | vllm")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature (reference 1.0)")
    top_p: float = arg(1.0, "nucleus sampling (reference 1.0 in training, 0.6 in evaluation)")
    # the loop
    max_turns: int = arg(16, "assistant turns, and tool responses, per trajectory (reference 16)")
    max_response_tokens: int = arg(320, "tokens per trajectory, tool tokens included (reference 20480)")
    max_prompt_tokens: int = arg(512, "prompts longer than this, measured with the chat template, are dropped "
                                      "(reference 2560 in training, 4096 in evaluation)")
    max_tool_calls_per_turn: int = arg(1, "tool calls executed per assistant turn (reference 1: the first)")
    # the tool
    tool_timeout: float = arg(60.0, "seconds per tool call (reference 60)")
    tool_memory_mb: int = arg(2048, "memory per tool call in MB (reference 2048)")
    max_tool_response_chars: int = arg(256, "tool output shown to the model, cut around the middle (reference 256)")
    autoprint: str = arg("reference", "tool auto-print of the last line: reference (any line) | expression "
                                      "(bare expressions only)")
    dedupe_tool_calls: bool = arg(True, "run identical tool calls of one turn batch once (exact for deterministic code)")
    tool_failure_rate: float = arg(0.0, "fraction of tool calls that fail transiently ('no stdout here'), a toy option")
    # the reward
    tool_shaping: str = arg("reference", "wrong-answer shaping: reference (-1.1) | turns (+0.1 per tool round) | none")
    overlong_buffer: int = arg(0, "DAPO overlong penalty buffer in tokens, 0 = off (reference 1024)")
    overlong_penalty: float = arg(1.0, "DAPO overlong penalty factor (reference 1.0)")


def rollout_settings(cfg, **changes) -> RolloutConfig:
    """The RolloutConfig part of a stage's config (a copy, with `changes` applied)."""
    return RolloutConfig(**{f.name: changes.get(f.name, getattr(cfg, f.name)) for f in fields(RolloutConfig)})


# -----------------------------------------------------------------------------
# 2. Data: the reference's prompt wrappers, byte-exact, and the loaders

MATH1 = "Analyze and solve the following math problem step by step. \n\n"
MATH2 = "\n\nThe tool could be used for more precise and efficient calculation and could help you to verify your result before you reach the final answer."
AGENT = "\n\n**Note: You should first analyze the problem and form a high-level solution strategy, then utilize the tools to help you solve the problem.**"
ANSFMT = "\nRemember once you make sure the current answer is your final answer, do not call the tools again and directly output the final answer in the following text format, the answer format must be: \\boxed{'The final answer goes here.'}."
NOUNITS_A = "\nDo not put units of the final answer inside \\boxed{}. The content of \\boxed{} should be the numerical value of the final answer only, without any units."
NOUNITS_B = "\nDo not put units of the final answer inside \\boxed{}. The content of \\boxed{} should be the final numerical value of the final answer only, without any units."
CODE_SUFFIX = "\nBefore sumbit your code, you can utilize tools to check the correctness of your code, once you make sure the current code is correct, do not call the tools again and submit your code within ```python\n# YOUR CODE HERE\n```."
LCB_START = "You will be given a question (problem specification) and will generate a correct Python program that matches the specification and passes all tests.\n\n"
LCB_CODEP = "\n\nRead the inputs from stdin solve the problem and write the answer to stdout (do not directly test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n```python\n# YOUR CODE HERE\n\""


def _maybe_json(x):
    return json.loads(x) if isinstance(x, str) and x[:1] in "{[" else x


def wrap_prompt(row: dict) -> tuple[str, str, object]:
    """One data row -> (user prompt text, data_source, ground truth), wrapped as the reference does.

    The wrapper is picked per row (README, deviations: first-row dispatch). Accepted layouts: the RL schema
    (prompt / data_source / reward_model), and the eval files (AIME2024: Problem/Answer, AIME2025:
    problem/answer, GPQA: problem/solution/domain, LiveCodeBench: problem + reward_model as a JSON string).
    """
    source = str(row.get("data_source", ""))
    reward_model = _maybe_json(row.get("reward_model")) or {}
    if "prompt" in row:  # RL schema: a chat list with one user message
        prompt = _maybe_json(row["prompt"])
        stored = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        truth = reward_model.get("ground_truth")
        if source.startswith("toy"):
            return stored, source, truth
        if source in ("math_dapo", "mega-science"):
            return stored + NOUNITS_A, source, truth
        if "code" in source.lower():
            return stored + AGENT + CODE_SUFFIX, source, truth
        return MATH1 + stored + MATH2 + AGENT + ANSFMT + NOUNITS_B, source, truth
    if "Problem" in row and "Answer" in row:  # AIME 2024 layout
        return MATH1 + row["Problem"] + MATH2 + AGENT + ANSFMT, source or "AIME2024", str(row["Answer"])
    if "problem" in row and "answer" in row:  # AIME 2025 layout
        return MATH1 + row["problem"] + MATH2 + AGENT + ANSFMT, source or "AIME2025", str(row["answer"])
    if "problem" in row and "solution" in row and "domain" in row:  # GPQA-Diamond
        text = (f"Analyze and solve the following {row['domain']} problem step by step. \n\n" + row["problem"]
                + MATH2 + AGENT + ANSFMT + "\n Here you need to put the final uppercase letter option of this problem into \\boxed{}")
        return text, source or "gpqa_diamond", str(row["solution"])
    if "problem" in row and reward_model:  # LiveCodeBench v6: the "examples" are the scoring tests
        truth = _maybe_json(reward_model["ground_truth"])
        examples = "\nHere are some input and output examples of the expected code:\nInput:" + str(truth["inputs"]) + "\nOutput:\n" + str(truth["outputs"])
        return LCB_START + row["problem"] + examples + AGENT + LCB_CODEP + CODE_SUFFIX, source or "LiveCodeBench_v6", truth
    raise ValueError(f"unknown row layout with columns {sorted(row)}; expected one of: "
                     "[prompt, data_source, reward_model] (RL), [Problem, Answer] (AIME2024), [problem, answer] (AIME2025), "
                     "[problem, solution, domain] (GPQA), [problem, reward_model] (LiveCodeBench)")


def load_rows(path: str) -> list[dict]:
    """Read a .jsonl / .json / .parquet file into a list of dicts, with errors that name the file and row."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if p.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("reading parquet needs pandas and pyarrow: pip install pandas pyarrow") from e
        return [_to_plain(r) for r in pd.read_parquet(p).to_dict(orient="records")]
    if p.suffix == ".json":
        return json.loads(p.read_text())
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def _to_plain(x):
    """parquet gives numpy arrays for lists; turn nested values back into lists and dicts."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def load_prompts(path: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """RL / eval prompts as {"prompt", "data_source", "ground_truth", "hint", "id"}; "toy[:split]" builds a toy split."""
    if path.startswith("toy"):
        from toy import task
        split = path.split(":")[1] if ":" in path else "train"
        rows = task.rl_rows(n or 256, split=split, seed=seed)
    else:
        rows = load_rows(path)
    out, bad = [], Counter()
    for i, row in enumerate(rows):
        try:
            text, source, truth = wrap_prompt(row)
            if truth is None:
                raise ValueError("no ground truth")
        except (ValueError, KeyError, TypeError) as e:
            bad[str(e)[:400]] += 1
            if len(bad) == 1 and sum(bad.values()) == 1:
                log.warning("%s row %d skipped: %s", path, i, e)
            continue
        out.append({"prompt": text, "data_source": source, "ground_truth": truth, "hint": row.get("hint"),
                    "id": row.get("id", i)})
    if bad:
        log.warning("%s: skipped %d malformed rows (%s)", path, sum(bad.values()), dict(bad))
    if not out:
        raise ValueError(f"{path}: no usable rows" + (f"; first problem: {next(iter(bad))}" if bad else ""))
    return out[:n] if n else out


def drop_long_prompts(prompts: list[dict], tokenizer, max_tokens: int, name: str = "") -> list[dict]:
    """The reference's filter_overlong_prompts: the user turn rendered by the chat template with the generation
    prompt, *without* the tools block, must fit in max_tokens."""
    def length(p):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))
    kept = [p for p in prompts if length(p) <= max_tokens]
    if len(kept) < len(prompts):
        log.info("%sdropped %d of %d prompts longer than %d tokens", f"{name}: " if name else "",
                 len(prompts) - len(kept), len(prompts), max_tokens)
    return kept


# -----------------------------------------------------------------------------
# 3. Models, tokenizers and checkpoints

def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str):
    """The tokenizer of a checkpoint, with `stop_token_ids`: every end-of-sequence id of the model (Qwen3's
    generation config lists <|im_end|> and <|endoftext|>), where generation stops."""
    from transformers import AutoTokenizer, GenerationConfig
    path = TOY_DIR / "tokenizer" if name_or_path in TOY_MODELS else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load a tokenizer from {name_or_path!r}: {e}\n"
                         "Give a local checkpoint folder, a Hugging Face name with the weights available, "
                         f"or one of the built-in toy models {sorted(TOY_MODELS)}.") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop = [tokenizer.eos_token_id]
    try:
        eos = GenerationConfig.from_pretrained(str(path)).eos_token_id
        stop += [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None and i not in stop]
    except OSError:
        pass  # no generation_config.json: the tokenizer's eos alone
    tokenizer.stop_token_ids = stop
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    return getattr(tokenizer, "stop_token_ids", None) or [tokenizer.eos_token_id]


def check_model_path(name_or_path: str):
    """Fail early and clearly on a local path that does not exist (anything else may be a Hugging Face name)."""
    if name_or_path in TOY_MODELS or Path(name_or_path).exists():
        return
    if name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise SystemExit(f"model path does not exist: {name_or_path} (the toy checkpoints come from sft.py, grpo.py, "
                         "or all at once from pipeline.py)")


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0):
    """A causal LM in eval mode; toy names build a randomly initialised tiny Qwen3 from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if name_or_path in TOY_MODELS:
        config = AutoConfig.from_pretrained(str(TOY_MODELS[name_or_path]))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
    else:
        check_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except OSError as e:
            raise SystemExit(f"could not load model {name_or_path!r}: {e}") from None
    return model.to(device=device, dtype=dtype).eval()


def check_same_tokenizer(student_tok, teacher_tok, student_name="student", teacher_name="teacher"):
    """On-policy distillation reads the teacher's log-prob of the *student's token ids*: the vocabularies must be identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = len(set(sv.items()) - set(tv.items()))
        raise SystemExit(f"tokenizer mismatch: {student_name} and {teacher_name} map {only_s} tokens differently "
                         f"(vocab sizes {len(sv)} vs {len(tv)}). The teacher must share the student's tokenizer "
                         "(Qwen3-0.6B/1.7B/4B do).")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise SystemExit(f"tokenizer mismatch: eos ids differ ({student_tok.eos_token_id} vs {teacher_tok.eos_token_id})")


def save_checkpoint(out_dir: Path, name: str, model, tokenizer, extra_state: dict | None = None):
    """out_dir/name as a Hugging Face folder (plus trainer_state.pt when given), written whole before it appears."""
    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra_state is not None:
        torch.save(extra_state, tmp / "trainer_state.pt")
    final = out_dir / name
    old = out_dir / f".{name}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)  # the rename is the commit point: a crash leaves either the old or the new folder
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def load_for_training(start: str, out_dir: Path, resume: bool, device: str, seed: int):
    """The model to train: out_dir/checkpoint when resuming, else `start`. Returns (model, trainer_state or None)."""
    ckpt = out_dir / "checkpoint"
    if resume and (ckpt / "trainer_state.pt").exists():
        model = load_model(str(ckpt), device=device, dtype=torch.float32)
        return model, torch.load(ckpt / "trainer_state.pt", weights_only=False)
    if resume:
        log.info("no checkpoint in %s: starting fresh", out_dir)
    return load_model(start, device=device, dtype=torch.float32, seed=seed), None


def write_jsonl(path, records: list[dict]):
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")


# -----------------------------------------------------------------------------
# 4. Generation backends: Hugging Face generate (CPU default) and vLLM (GPU default)

def _cut_at_stop(ids: list[int], stop_ids: list[int], budget: int) -> list[int]:
    """A turn ends with the first stop token the model sampled (kept: it is trained on) or at its budget."""
    ids = ids[:budget]
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            return ids[:i + 1]
    return ids


@torch.no_grad()
def generate_hf(model, contexts: list[list[int]], max_new_tokens: list[int], temperature: float, top_p: float,
                stop_ids: list[int], pad_id: int, batch_size: int = 256) -> list[list[int]]:
    """Sample one continuation per context, each cut after its first stop token and to its own budget."""
    device = next(model.parameters()).device
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))  # similar lengths together: less padding
    outputs: list[list[int]] = [[] for _ in contexts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(contexts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: generation continues from the right edge
            input_ids[row, width - len(contexts[i]):] = torch.tensor(contexts[i])
            attention_mask[row, width - len(contexts[i]):] = 1
        greedy = temperature <= 0
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max(max_new_tokens[i] for i in idx), do_sample=not greedy,
                             temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                             top_k=None, eos_token_id=stop_ids, pad_token_id=pad_id)
        new_tokens = out[:, width:].tolist()
        for row, i in enumerate(idx):
            outputs[i] = _cut_at_stop(new_tokens[row], stop_ids, max_new_tokens[i])
    return outputs


def make_vllm_engine(model_path: str, seed: int = 0, gpu_memory_utilization: float = 0.5, max_model_len: int | None = None):
    """A colocated, in-process vLLM engine. In-process is what lets us push weights without a disk round trip."""
    if model_path in TOY_MODELS:
        raise SystemExit(f"vLLM loads weights from a folder; {model_path!r} is a random toy model: run sft.py first")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM
    except ImportError as e:
        raise SystemExit("--backend vllm needs vLLM (pip install vllm; on CPU: pip install -r requirements-vllm.txt)") from e
    on_gpu = torch.cuda.is_available()
    kwargs = dict(model=model_path, seed=seed, dtype="bfloat16" if on_gpu else "float32", enforce_eager=not on_gpu,
                  enable_prefix_caching=True)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    return LLM(**kwargs)


def generate_vllm(llm, contexts: list[list[int]], max_new_tokens: list[int], temperature: float, top_p: float,
                  stop_ids: list[int], seed: int | None = None) -> list[list[int]]:
    """vLLM keeps the stop token it sampled in token_ids; nothing is appended that the model did not sample."""
    from vllm import SamplingParams
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max(1, m), stop_token_ids=list(stop_ids),
                             seed=None if seed is None else seed + i) for i, m in enumerate(max_new_tokens)]
    results = llm.generate([{"prompt_token_ids": c} for c in contexts], params, use_tqdm=False)
    return [_cut_at_stop(list(r.outputs[0].token_ids), stop_ids, m) for r, m in zip(results, max_new_tokens)]


def push_weights_to_vllm(llm, model):
    """Copy the trainer's current weights into the colocated vLLM engine (no restart, no disk)."""
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    runner.reload_weights(weights_iterator=iter((k, v.detach()) for k, v in model.state_dict().items()))


def generate(engine, contexts, max_new_tokens, cfg: RolloutConfig, stop_ids, pad_id, seed=None):
    """One function over both backends: `engine` is an HF model or a vLLM `LLM` (or, in tests, any
    function (contexts, max_new_tokens, cfg) -> continuations)."""
    if isinstance(engine, torch.nn.Module):
        return generate_hf(engine, contexts, max_new_tokens, cfg.temperature, cfg.top_p, stop_ids, pad_id)
    if hasattr(engine, "llm_engine"):
        return generate_vllm(engine, contexts, max_new_tokens, cfg.temperature, cfg.top_p, stop_ids, seed=seed)
    return engine(contexts, max_new_tokens, cfg)


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "hf", "vllm"):
        raise SystemExit(f"--backend must be auto, hf or vllm, not {backend!r}")
    if backend != "auto":
        return backend
    try:
        import vllm  # noqa: F401
        return "vllm" if torch.cuda.is_available() else "hf"
    except ImportError:
        return "hf"


# -----------------------------------------------------------------------------
# 5. The multi-turn tool loop

def render_prompt_ids(tokenizer, prompt: str, tools_schema: list[dict] | None = None) -> list[int]:
    """The initial context: system block declaring the tools, the user turn, and `<|im_start|>assistant\\n`.
    `enable_thinking` is not passed, as in the reference, so no empty think block is pre-filled."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tools=tools_schema or [tools.TOOL_SCHEMA],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def render_tool_response_ids(tokenizer, outputs: list[str]) -> list[int]:
    """Tool outputs as the chat template renders `tool` messages, plus the next generation prompt.

    "\\n" first: the newline that follows the assistant's <|im_end|> in the template (see docstring).
    """
    text = tokenizer.apply_chat_template([{"role": "tool", "content": o} for o in outputs],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode("\n" + text, add_special_tokens=False)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn in response_ids
    turns: list[dict] = field(default_factory=list)              # per assistant turn: tokens, tool call, status
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
                "num_turns": self.num_turns, "num_tool_calls": self.num_tool_calls, "stop_reason": self.stop_reason,
                "response_tokens": len(self.response_ids), "turns": self.turns, "text": self.text}


def _finish(traj: Trajectory, reason: str, cfg: RolloutConfig):
    traj.stop_reason = reason
    traj.response_ids = traj.response_ids[:cfg.max_response_tokens]
    traj.response_mask = traj.response_mask[:cfg.max_response_tokens]
    traj.steps = [(s, min(e, cfg.max_response_tokens)) for s, e in traj.steps if s < cfg.max_response_tokens]


def rollout(engine, tokenizer, prompts: list[dict], n: int, cfg: RolloutConfig, seed: int | None = None,
            counts: Counter | None = None, progress: bool = False) -> list[Trajectory]:
    """n trajectories per prompt. All live trajectories generate together, turn by turn; finished ones drop out.
    Sampling follows cfg.temperature and cfg.top_p. Trajectories of prompt i sit at [i*n, (i+1)*n) (the GRPO groups).
    """
    from tqdm import tqdm
    counts = counts if counts is not None else Counter()
    stop_ids, pad_id = stop_token_ids(tokenizer), tokenizer.pad_token_id
    if seed is not None:
        torch.manual_seed(seed)
    trajs = []
    for i, p in enumerate(prompts):
        prompt_ids = render_prompt_ids(tokenizer, p["prompt"])
        trajs += [Trajectory(prompt_ids=prompt_ids, prompt_index=i, data_source=p["data_source"], ground_truth=p["ground_truth"])
                  for _ in range(n)]
    live = list(trajs)
    flaky = random.Random(None if seed is None else seed + 17)  # transient tool failures, when cfg asks for them
    bar = tqdm(total=cfg.max_turns, desc="rollout turns", leave=False, disable=not progress)
    while live:
        # (per turn) budget = what is left of the trajectory's token budget, as the reference's max_tokens
        budgets = [cfg.max_response_tokens - len(t.response_ids) for t in live]
        outs = generate(engine, [t.prompt_ids + t.response_ids for t in live], budgets, cfg, stop_ids, pad_id,
                        seed=None if seed is None else seed + 7919 * len(live[0].steps))
        pending: list[tuple[Trajectory, list[dict]]] = []
        for t, ids in zip(live, outs):
            t.steps.append((len(t.response_ids), len(t.response_ids) + len(ids)))
            t.response_ids += ids
            t.response_mask += [1] * len(ids)
            t.num_turns += 1
            turn = {"tokens": len(ids), "tool_call": None, "tool_status": None}
            t.turns.append(turn)
            assistant_turns = len(t.steps)
            user_turns = t.num_turns - 1 - assistant_turns
            if len(t.response_ids) >= cfg.max_response_tokens:
                _finish(t, "length", cfg)
                continue
            if assistant_turns >= cfg.max_turns or user_turns >= cfg.max_turns:
                _finish(t, "max_turns", cfg)
                continue
            calls = tools.parse_tool_calls(tokenizer.decode(ids, skip_special_tokens=False), counts)
            if not calls:
                _finish(t, "answer", cfg)
                continue
            calls = calls[:cfg.max_tool_calls_per_turn]
            turn["tool_call"] = calls[0]["arguments"].get("code") if calls[0]["name"] == tools.TOOL_NAME else calls[0]
            pending.append((t, calls))
        # the tool calls of this turn, all trajectories at once, in parallel
        flat = [c for _, calls in pending for c in calls]
        t_tools = time.time()
        results = run_calls(flat, cfg)
        counts["tool_seconds"] += time.time() - t_tools
        k = 0
        live = []
        for t, calls in pending:
            texts = results[k:k + len(calls)]
            k += len(calls)
            if cfg.tool_failure_rate > 0 and flaky.random() < cfg.tool_failure_rate:
                texts = [tools.NO_STDOUT] * len(texts)  # what the reference shows for a sandbox timeout or failure
            failed = any(tools.tool_call_failed(x) for x in texts)
            t.num_tool_calls += len(calls)
            t.num_tool_errors += int(failed)
            counts["tool_calls"] += len(calls)
            counts["tool_errors"] += int(failed)
            t.turns[-1].update(tool_status="error" if failed else "ok", tool_output_chars=sum(map(len, texts)),
                               tool_output_truncated="...(truncated)..." in "".join(texts))
            segment = render_tool_response_ids(tokenizer, texts)
            if len(t.response_ids) + len(segment) >= cfg.max_response_tokens:
                _finish(t, "length", cfg)  # stop *without* appending: a trajectory always ends with a model turn
                continue
            t.response_ids += segment
            t.response_mask += [0] * len(segment)
            t.num_turns += 1
            live.append(t)
        bar.update(1)
    bar.close()
    for t in trajs:
        score_trajectory(t, tokenizer, cfg)
    return trajs


def run_calls(calls: list[dict], cfg: RolloutConfig) -> list[str]:
    """Tool texts for a turn's calls, run in parallel. With cfg.dedupe_tool_calls, identical calls (the n samples
    of a prompt often write the same code) run once and share the answer: exact for deterministic code."""
    if not calls:
        return []
    keys = [json.dumps(c, sort_keys=True) for c in calls]
    unique = list(dict.fromkeys(keys)) if cfg.dedupe_tool_calls else keys
    by_key = {k: c for k, c in zip(keys, calls)}
    texts = tools.run_tool_calls([by_key[k] for k in unique], timeout=cfg.tool_timeout, memory_mb=cfg.tool_memory_mb,
                                 autoprint=cfg.autoprint, max_output_chars=cfg.max_tool_response_chars)
    if not cfg.dedupe_tool_calls:
        return texts
    answer = dict(zip(unique, texts))
    return [answer[k] for k in keys]


def score_trajectory(t: Trajectory, tokenizer, cfg: RolloutConfig):
    """Reward from the decoded response (tool segments included, special tokens skipped), as the reference."""
    t.text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
    result = tools.compute_score(t.data_source, t.text, t.ground_truth, {"num_turns": t.num_turns},
                                 tool_shaping=cfg.tool_shaping)
    t.score, t.acc, t.pred = float(result["score"]), bool(result["acc"]), result["pred"] or ""
    t.reward = t.score + overlong_penalty(len(t.response_ids), cfg.max_response_tokens, cfg.overlong_buffer, cfg.overlong_penalty)


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO soft overlong penalty: 0 until max_length - buffer, then linear down to -factor."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_length - buffer)) / buffer * factor, 0.0)


# -----------------------------------------------------------------------------
# 6. Batches and log-probs

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
        [t.prompt_ids + t.response_ids for t in trajs], [[0] * len(t.prompt_ids) + t.response_mask for t in trajs],
        pad_id, device)
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


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, chunk_bytes: int = 256 * 2**20,
                   max_chunk_tokens: int = 2048, with_entropy: bool = False):
    """[B, T-1] float32, entry [b, t] = log p_T(input_ids[b, t+1] | input_ids[b, :t+1]) with p_T = softmax(logits / T),
    the distribution the rollout sampled from at temperature T. With `with_entropy`, also the entropy of that
    next-token distribution: a pair of [B, T-1] tensors.

    The body runs once over the whole batch; the vocabulary projection runs on chunks of positions sized so a
    chunk's float32 logits stay under `chunk_bytes` (and at most `max_chunk_tokens` positions, so even a small
    vocabulary never gets logits for a whole batch at once). Under autograd each chunk is checkpointed, so the backward
    pass recomputes its logits instead of keeping all of them alive.
    """
    temperature = temperature if temperature > 0 else 1.0  # greedy decoding samples no distribution: score at T = 1
    # bf16 autocast on CUDA (fp32 master weights, like the reference's mixed precision); a no-op on CPU
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]  # [B, T-1, H]
    labels = input_ids[:, 1:]                                                                                   # [B, T-1]
    B, Tm1, H = hidden.shape
    lm_head = model.get_output_embeddings()
    flat_h, flat_y = hidden.reshape(-1, H), labels.reshape(-1)                                                  # [N, H], [N]
    chunk = max(1, min(max_chunk_tokens, chunk_bytes // (4 * lm_head.weight.shape[0])))
    parts = []
    for s in range(0, flat_h.shape[0], chunk):
        h, y = flat_h[s:s + chunk], flat_y[s:s + chunk]
        if torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, lm_head, h, y, temperature, with_entropy,
                                                           use_reentrant=False))
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
    data: str = arg("toy:eval", "'toy[:split]' or a .jsonl/.parquet file")
    num_prompts: int = arg(8, "prompts to roll out")
    n: int = arg(4, "samples per prompt")
    seed: int = arg(0, "random seed")
    log_file: str = arg("", "optional per-trajectory JSONL")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(Args)
    tokenizer = load_tokenizer(args.model)
    backend = resolve_backend(args.backend)
    engine = make_vllm_engine(args.model, seed=args.seed) if backend == "vllm" else load_model(args.model, seed=args.seed)
    prompts = load_prompts(args.data, args.num_prompts, seed=args.seed)
    counts = Counter()
    t0 = time.time()
    trajs = rollout(engine, tokenizer, prompts, args.n, args, seed=args.seed, counts=counts, progress=True)
    dt = time.time() - t0
    tokens = sum(sum(t.response_mask) for t in trajs)
    print(f"{len(trajs)} trajectories in {dt:.1f}s ({tokens / dt:.0f} generated tokens/s); "
          f"accuracy {sum(t.acc for t in trajs) / len(trajs):.3f}; tool calls {counts['tool_calls']} "
          f"({counts['tool_seconds']:.1f}s in tools), errors {counts['tool_errors']}")
    print("example:\n" + tokenizer.decode(trajs[0].prompt_ids[-20:] + trajs[0].response_ids))
    if args.log_file:
        write_jsonl(args.log_file, [t.log_record() for t in trajs])
