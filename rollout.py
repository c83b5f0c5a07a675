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
    python rollout.py --model runs/sft-student/final --num_prompts 64 --n_samples 8
    python rollout.py --model Qwen/Qwen3-0.6B --data Open-AgentRL-30K.parquet --backend vllm \\
        --n_samples 16   # GPU
"""
import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

import tools

log = logging.getLogger("rollout")
REPO_DIR = Path(__file__).resolve().parent
TOY_DIR = REPO_DIR / "toy"
TOY_MODELS = {"toy-student": TOY_DIR / "student_config.json", "toy-teacher": TOY_DIR / "teacher_config.json",
              "toy-teacher-large": TOY_DIR / "teacher_large_config.json"}


# -----------------------------------------------------------------------------
# 1. Settings: config dataclasses as command-line flags

def arg(default, help: str):
    """A config field with its command-line help string (every stage's config is a dataclass of these)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_bool(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
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
    vllm_kv_cache_gb: float = arg(4.0, "vLLM's KV-cache budget in GiB, on a GPU or a CPU")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature "
                                  "(reference 1.0)")
    top_p: float = arg(1.0, "nucleus sampling (reference 1.0 in training, 0.6 in evaluation)")
    # the loop
    max_turns: int = arg(16, "assistant turns, and tool responses, per trajectory (reference 16)")
    max_response_tokens: int = arg(320, "tokens per trajectory, tool tokens included (reference 20480)")
    max_prompt_tokens: int = arg(512, "prompts longer than this, measured with the chat template, are "
                                      "dropped (reference 2560 in training, 4096 in evaluation)")
    max_tool_calls_per_turn: int = arg(1, "tool calls executed per assistant turn (reference 1: the first)")
    tool_junction: str = arg("template", "the ids between a turn's <|im_end|> and the next tool response: "
                                         "template (the chat template's newline, as SFT data has it) "
                                         "| reference (none)")
    # the tool
    sandbox: str = arg("warm", "local sandbox: warm (forked from pooled interpreters) "
                               "| cold (a new one per call)")
    sandbox_url: str = arg("", "a SandboxFusion server for tool calls and code tests, instead of the local "
                               "sandbox")
    tool_timeout: float = arg(60.0, "seconds per tool call, also the cap on a call's own `timeout` "
                                    "(reference 60)")
    tool_memory_mb: int = arg(2048, "memory per tool call in MB (reference 2048)")
    max_tool_response_chars: int = arg(256, "tool output shown to the model, cut around the middle "
                                            "(reference 256)")
    autoprint: str = arg("reference", "tool auto-print of the last line: reference (any line) | expression "
                                      "(bare expressions only)")
    dedupe_tool_calls: bool = arg(True, "run identical tool calls of one turn batch once "
                                        "(exact for deterministic code)")
    tool_failure_rate: float = arg(0.0, "fraction of tool calls that fail transiently ('no stdout here'), "
                                        "a toy option")
    # the reward
    math_scoring: str = arg("strict", "math and GPQA answers: strict (the reference's exact last box) "
                                      "| lenient (math-verify's symbolic equivalence)")
    code_scoring: str = arg("fixed", "code problems: fixed | reference (the authors' </think> split, newline "
                                     "unescaping and object-tests bugs; README, deviations)")
    tool_shaping: str = arg("reference", "wrong-answer shaping: reference (-1.1) "
                                         "| turns (+0.1 per tool round) | none")
    overlong_buffer: int = arg(0, "DAPO overlong penalty buffer in tokens, 0 = off (reference 1024)")
    overlong_penalty: float = arg(1.0, "DAPO overlong penalty factor (reference 1.0)")


CHOICES = {"backend": ("auto", "hf", "vllm"), "autoprint": ("reference", "expression"),
           "tool_junction": ("template", "reference"), "sandbox": ("warm", "cold"),
           "code_scoring": ("fixed", "reference"), "math_scoring": ("strict", "lenient"),
           "tool_shaping": ("reference", "turns", "none")}


def check_rollout_settings(cfg):
    """A setting with a fixed set of values, given another one, stops the run before anything starts."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {' | '.join(allowed)}, not {getattr(cfg, name)!r}")


def rollout_settings(cfg, **changes) -> RolloutConfig:
    """The RolloutConfig part of a stage's config (a copy, with `changes` applied)."""
    return RolloutConfig(**{f.name: changes.get(f.name, getattr(cfg, f.name)) for f in fields(RolloutConfig)})


# -----------------------------------------------------------------------------
# 2. Data: the reference's prompt wrappers, byte-exact, and the loaders

MATH1 = "Analyze and solve the following math problem step by step. \n\n"
MATH2 = ("\n\nThe tool could be used for more precise and efficient calculation and could help you to verify "
         "your result before you reach the final answer.")
AGENT = ("\n\n**Note: You should first analyze the problem and form a high-level solution strategy, then "
         "utilize the tools to help you solve the problem.**")
ANSFMT = ("\nRemember once you make sure the current answer is your final answer, do not call the tools "
          "again and directly output the final answer in the following text format, the answer format must "
          "be: \\boxed{'The final answer goes here.'}.")
NOUNITS_A = ("\nDo not put units of the final answer inside \\boxed{}. The content of \\boxed{} should be "
             "the numerical value of the final answer only, without any units.")
NOUNITS_B = ("\nDo not put units of the final answer inside \\boxed{}. The content of \\boxed{} should be "
             "the final numerical value of the final answer only, without any units.")
CODE_SUFFIX = ("\nBefore sumbit your code, you can utilize tools to check the correctness of your code, once "
               "you make sure the current code is correct, do not call the tools again and submit your code "
               "within ```python\n# YOUR CODE HERE\n```.")
LCB_START = ("You will be given a question (problem specification) and will generate a correct Python "
             "program that matches the specification and passes all tests.\n\n")
LCB_CODEP = ("\n\nRead the inputs from stdin solve the problem and write the answer to stdout "
             "(do not directly test on the sample inputs). Enclose your code within delimiters as follows. "
             "Ensure that when the python program runs, it reads the inputs, runs the algorithm and writes "
             "output to STDOUT.\n```python\n# YOUR CODE HERE\n\"")


def _maybe_json(x):
    return json.loads(x) if isinstance(x, str) and x[:1] in "{[" else x


def wrap_prompt(row: dict) -> tuple[str, str, object]:
    """One data row -> (user prompt text, data_source, ground truth), wrapped as the reference does.

    The wrapper follows the row's data_source, as recipe/demystify/reward.py chooses it (per row here, not
    from the file's first row: README, deviations); the columns decide only where data_source is missing.
    Layouts: the RL schema (prompt / data_source / reward_model), AIME (Problem/Answer or problem/answer),
    GPQA (problem/solution/domain), LiveCodeBench (problem + reward_model as a JSON string).
    """
    source = str(row.get("data_source") or "")
    reward_model = _maybe_json(row.get("reward_model")) or {}
    if "prompt" in row:  # RL schema: a chat list with one user message
        prompt = _maybe_json(row["prompt"])
        stored = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        truth = reward_model.get("ground_truth")
        if source.startswith("toy"):
            return stored, source, truth
        if source in ("math_dapo", "mega-science"):
            return stored + NOUNITS_A, source, truth
        if "code" in source:
            return stored + AGENT + CODE_SUFFIX, source, truth
        return MATH1 + stored + MATH2 + AGENT + ANSFMT + NOUNITS_B, source, truth
    columns = set(row)
    if source in ("AIME2024", "AIME2025") or (not source and ({"Problem", "Answer"} <= columns or
                                                               {"problem", "answer"} <= columns)):
        problem, answer = ((row["Problem"], row["Answer"]) if "Problem" in row
                           else (row["problem"], row["answer"]))
        return MATH1 + problem + MATH2 + AGENT + ANSFMT, source or "AIME", str(answer)
    if source == "gpqa_diamond" or (not source and {"problem", "solution", "domain"} <= columns):
        text = (f"Analyze and solve the following {row['domain']} problem step by step. \n\n" + row["problem"]
                + MATH2 + AGENT + ANSFMT
                + "\n Here you need to put the final uppercase letter option of this problem into \\boxed{}")
        return text, source or "gpqa_diamond", str(row["solution"])
    if source == "LiveCodeBench_v6" or (not source and "problem" in row and reward_model):
        # the "examples" are the scoring tests, as in the authors' prompt (README, deviations)
        truth = _maybe_json(reward_model["ground_truth"])
        examples = ("\nHere are some input and output examples of the expected code:\nInput:"
                    + str(truth["inputs"]) + "\nOutput:\n" + str(truth["outputs"]))
        return (LCB_START + row["problem"] + examples + AGENT + LCB_CODEP + CODE_SUFFIX,
                source or "LiveCodeBench_v6", truth)
    raise ValueError(f"data_source {source!r} with columns {sorted(row)} matches no prompt wrapper; "
                     "expected one of: [prompt, data_source, reward_model] (RL), "
                     "AIME2024/AIME2025 [Problem, Answer] or [problem, answer], "
                     "gpqa_diamond [problem, solution, domain], LiveCodeBench_v6 [problem, reward_model]")


def load_rows(path: str) -> list[dict]:
    """Read a .jsonl / .json / .parquet file into a list of dicts; a file that cannot be read stops the run
    with its name and the reason."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"data file not found: {path}")
    if p.stat().st_size == 0:
        raise SystemExit(f"{path}: the file is empty (0 bytes)")
    if p.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("reading parquet needs pandas and pyarrow: pip install pandas pyarrow") from e
        try:
            frame = pd.read_parquet(p)
        except Exception as e:  # pyarrow's errors name neither the file nor the problem in plain words
            raise SystemExit(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        return [_to_plain(r) for r in frame.to_dict(orient="records")]
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise SystemExit(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
        return rows
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not valid JSON ({e})") from None
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


KNOWN_SOURCES = {"toy_arith", "math_dapo", "mega-science", "AIME2024", "AIME2025",
                 "gpqa_diamond"}  # plus any "code"


def toy_steps_range(text: str) -> tuple[int, int]:
    """"2-4" -> (2, 4): how many dependent tool calls a toy problem needs."""
    try:
        low, high = (int(x) for x in text.split("-"))
        assert 1 <= low <= high <= 8
    except (ValueError, AssertionError):
        raise SystemExit("--toy_steps must be like 2-4 (from 1 to 8 dependent calls), "
                         f"not {text!r}") from None
    return low, high


def load_prompts(path: str, n: int | None = None, seed: int = 0, toy_steps: str = "2-4") -> list[dict]:
    """RL / eval prompts as {"prompt", "data_source", "ground_truth", "hint", "id"}; "toy[:split]" builds a
    toy split (train, eval, valid) of problems needing `toy_steps` dependent calls. Malformed rows are skipped
    and counted; rows of a data_source no grader knows are counted and graded as math."""
    if path.startswith("toy"):
        from toy import task
        split = path.split(":")[1] if ":" in path else "train"
        rows = task.rl_rows(n or 256, split=split, seed=seed, steps=toy_steps_range(toy_steps))
    else:
        rows = load_rows(path)
    out, bad, unknown = [], Counter(), Counter()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"a row must be an object, not a {type(row).__name__}")
            text, source, truth = wrap_prompt(row)
            if truth is None:
                raise ValueError("no ground truth")
            if "code" in source.lower():
                tools.check_code_tests(truth)
        except (ValueError, KeyError, TypeError) as e:
            bad[str(e)[:400]] += 1
            if sum(bad.values()) == 1:
                log.warning("%s row %d skipped: %s", path, i, e)
            continue
        if source not in KNOWN_SOURCES and "code" not in source.lower():
            unknown[source] += 1
        out.append({"prompt": text, "data_source": source, "ground_truth": truth, "hint": row.get("hint"),
                    "id": row.get("id", i)})
    if bad:
        log.warning("%s: skipped %d malformed rows (%s)", path, sum(bad.values()), dict(bad))
    if unknown:
        log.warning("%s: %d rows have a data_source without a grader of its own (%s): graded as math with "
                    "the strict box, as the authors' reward does for every source without 'code'",
                    path, sum(unknown.values()), dict(unknown))
    if not out:
        raise SystemExit(f"{path}: no usable rows"
                         + (f"; the first problem: {next(iter(bad))}" if bad else ""))
    return out[:n] if n else out


def drop_long_prompts(prompts: list[dict], tokenizer, max_tokens: int, name: str = "") -> list[dict]:
    """The reference's filter_overlong_prompts: the user turn rendered by the chat template with the
    generation prompt, *without* the tools block, must fit in max_tokens."""
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
# 3. Models and tokenizers

# the toy checkpoints the stages look for by default, and the command that makes each
DEFAULT_CHECKPOINTS = {
    "runs/sft-student/final": "python sft.py",
    "runs/sft-teacher/final": "python sft.py --model toy-teacher --out_dir runs/sft-teacher "
                              "--toy_recovery_frac 0 --toy_direct_frac 0.5 --epochs 5",
    "runs/grpo-teacher/final": "python grpo.py",
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def in_hub_cache(name: str) -> bool:
    """A Hugging Face id (namespace/name) whose files are in the local cache."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id=name, filename="config.json"), str)


def check_model_path(name_or_path: str, needs: str = "config.json"):
    """Fail early, before anything is written, on a model that is neither a toy name, nor a local folder
    holding `needs`, nor a Hugging Face model in the local cache. Nothing is downloaded at run time (N ranks
    downloading the same weights at once helps nobody): fetch a model once with
    `hf download <namespace/name>`."""
    if name_or_path in TOY_MODELS:
        return
    path = Path(name_or_path)
    if path.is_dir():
        if needs and not (path / needs).exists():
            raise SystemExit(f"not a model folder (no {needs}): {name_or_path}")
        return
    if in_hub_cache(name_or_path):
        return
    made_by = DEFAULT_CHECKPOINTS.get(name_or_path.rstrip("/"))
    hint = (f"; it is made by: {made_by} (or all at once: python pipeline.py)" if made_by else
            f"; if it is a Hugging Face model, download it first: hf download {name_or_path}"
            if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
            and not Path(name_or_path.split("/")[0]).is_dir() else
            f"; the toy models are {', '.join(sorted(TOY_MODELS))}")
    raise SystemExit(f"model path does not exist: {name_or_path} (not a local folder, nor a Hugging Face "
                     f"model in the local cache){hint}")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a checkpoint, with `stop_token_ids`: every end-of-sequence id of the model (Qwen3's
    generation config lists <|im_end|> and <|endoftext|>), where generation stops."""
    from transformers import AutoTokenizer, GenerationConfig
    check_model_path(name_or_path, needs="")
    path = TOY_DIR / "tokenizer" if name_or_path in TOY_MODELS else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load a tokenizer from {name_or_path!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stop = [tokenizer.eos_token_id]
    try:
        eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
        stop += [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None and i not in stop]
    except OSError:
        pass  # no generation_config.json: the tokenizer's eos alone
    tokenizer.stop_token_ids = stop
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    return getattr(tokenizer, "stop_token_ids", None) or [tokenizer.eos_token_id]


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0):
    """A causal LM in eval mode; toy names build a randomly initialised tiny Qwen3 from its config.
    A checkpoint whose weights are not all finite is refused, with the file named."""
    from transformers import AutoConfig, AutoModelForCausalLM
    device = str(device or default_device())
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    check_model_path(name_or_path)
    if name_or_path in TOY_MODELS:
        config = AutoConfig.from_pretrained(str(TOY_MODELS[name_or_path]))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, local_files_only=True)
        except Exception as e:
            # a truncated safetensors file, a missing shard, a hub error: name what was read
            files = (sorted(p.name for p in Path(name_or_path).glob("*.safetensors"))
                     if Path(name_or_path).is_dir() else [])
            where = f"{name_or_path}/{files[0]}" if len(files) == 1 else name_or_path
            raise SystemExit(f"could not load model weights from {where}: {type(e).__name__}: {e}") from None
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise SystemExit(f"{name_or_path}: the weights are not finite (NaN or inf) in {len(bad)} "
                             f"tensors, e.g. {bad[0]}; refusing to start from them")
    return model.to(device=device, dtype=dtype).eval()


def check_same_tokenizer(student_tok, teacher_tok, student_name="student", teacher_name="teacher"):
    """On-policy distillation reads the teacher's log-prob of the *student's token ids*: the vocabularies must
    be identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        differ = sorted({t for t in sv.keys() | tv.keys() if sv.get(t) != tv.get(t)},
                        key=lambda t: sv.get(t, tv.get(t)))
        raise SystemExit(f"tokenizer mismatch: {student_name} ({len(sv)} tokens) and {teacher_name} "
                         f"({len(tv)} tokens) disagree on {len(differ)} tokens, e.g. {differ[:3]}. "
                         "The teacher scores the student's token ids, so both must share one tokenizer "
                         "(Qwen3-0.6B/1.7B/4B do).")
    if (stop_token_ids(student_tok) != stop_token_ids(teacher_tok)
            or student_tok.eos_token_id != teacher_tok.eos_token_id):
        raise SystemExit(f"tokenizer mismatch: end-of-sequence ids differ ({stop_token_ids(student_tok)} vs "
                         f"{stop_token_ids(teacher_tok)})")


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
    # similar lengths together: less padding
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
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


def make_vllm_engine(model_path: str, seed: int = 0, d: "Dist | None" = None, kv_cache_gb: float = 4.0,
                     max_model_len: int | None = None):
    """A colocated, in-process vLLM engine (in-process is what lets us push weights without a disk round
    trip), with an explicit KV-cache budget in GiB, on a GPU or a CPU. Under torchrun every rank holds its own
    engine (vLLM's external launcher, data parallel: each rank generates for its own prompts)."""
    check_model_path(model_path)
    if model_path in TOY_MODELS:
        raise SystemExit(f"vLLM loads weights from a folder; {model_path!r} is a random toy model: "
                         "run sft.py first")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
    try:
        from vllm import LLM
    except ImportError as e:
        raise SystemExit("--backend vllm needs vLLM (pip install vllm; "
                         "on CPU: pip install -r requirements-vllm.txt)") from e
    kwargs = dict(model=model_path, seed=seed, dtype="bfloat16" if on_gpu else "float32",
                  enforce_eager=not on_gpu, enable_prefix_caching=True,
                  kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
    if d is not None and d.world > 1:
        kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=d.world)
    if max_model_len:
        kwargs["max_model_len"] = max_model_len
    return LLM(**kwargs)


def generate_vllm(llm, contexts: list[list[int]], max_new_tokens: list[int], temperature: float, top_p: float,
                  stop_ids: list[int], seed: int | None = None) -> list[list[int]]:
    """vLLM keeps the stop token it sampled in token_ids; nothing is appended that the model did not
    sample."""
    from vllm import SamplingParams
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max(1, m),
                             stop_token_ids=list(stop_ids), seed=None if seed is None else seed + i)
              for i, m in enumerate(max_new_tokens)]
    results = llm.generate([{"prompt_token_ids": c} for c in contexts], params, use_tqdm=False)
    return [_cut_at_stop(list(r.outputs[0].token_ids), stop_ids, m) for r, m in zip(results, max_new_tokens)]


def push_weights(engine, model, d: "Dist | None" = None):
    """Copy the trainer's current weights into the generation engine: a colocated vLLM engine (no restart, no
    disk), or the plain replica that generates for a sharded model."""
    weights = full_state_dict(model, d or Dist(), everywhere=True)
    if hasattr(engine, "llm_engine"):
        runner = engine.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.reload_weights(weights_iterator=iter((k, v.detach()) for k, v in weights.items()))
    else:
        engine.load_state_dict(weights)


def generate(engine, contexts, max_new_tokens, cfg: RolloutConfig, stop_ids, pad_id, seed=None):
    """One function over both backends: `engine` is an HF model or a vLLM `LLM` (or, in tests, any
    function (contexts, max_new_tokens, cfg) -> continuations)."""
    if isinstance(engine, torch.nn.Module):
        return generate_hf(engine, contexts, max_new_tokens, cfg.temperature, cfg.top_p, stop_ids, pad_id)
    if hasattr(engine, "llm_engine"):
        return generate_vllm(engine, contexts, max_new_tokens, cfg.temperature, cfg.top_p,
                             stop_ids, seed=seed)
    return engine(contexts, max_new_tokens, cfg)


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
# 5. The multi-turn tool loop

def render_prompt_ids(tokenizer, prompt: str, tools_schema: list[dict] | None = None) -> list[int]:
    """The initial context: system block declaring the tools, the user turn, and `<|im_start|>assistant\\n`.
    `enable_thinking` is not passed, as in the reference, so no empty think block is pre-filled."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tools=tools_schema or [tools.TOOL_SCHEMA],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def render_tool_response_ids(tokenizer, outputs: list[str], junction: str = "template") -> list[int]:
    """Tool outputs as the chat template renders `tool` messages, plus the next generation prompt.

    With junction="template", "\\n" first: the newline that follows the assistant's <|im_end|> in the chat
    template, so a rollout has the template's ids (and SFT's). "reference" leaves it out, as the authors'
    agent loop does (tool_agent_loop.py renders the tool message alone): every turn after the first then
    starts after "<|im_end|><|im_start|>user", a junction the first turn never sees (README, deviations).
    """
    text = tokenizer.apply_chat_template([{"role": "tool", "content": o} for o in outputs],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(("\n" if junction == "template" else "") + text, add_special_tokens=False)


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    # [start, end) of each assistant turn in response_ids
    steps: list[tuple[int, int]] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)  # per assistant turn: tokens, tool call, status
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
                "turns": self.turns, "text": self.text}


def _finish(traj: Trajectory, reason: str, cfg: RolloutConfig):
    traj.stop_reason = reason
    traj.response_ids = traj.response_ids[:cfg.max_response_tokens]
    traj.response_mask = traj.response_mask[:cfg.max_response_tokens]
    traj.steps = [(s, min(e, cfg.max_response_tokens)) for s, e in traj.steps if s < cfg.max_response_tokens]


def rollout(engine, tokenizer, prompts: list[dict], n: int, cfg: RolloutConfig, seed: int | None = None,
            counts: Counter | None = None, progress: bool = False) -> list[Trajectory]:
    """n trajectories per prompt. All live trajectories generate together, turn by turn; finished ones drop
    out. Sampling follows cfg.temperature and cfg.top_p. Trajectories of prompt i sit at [i*n, (i+1)*n) (the
    GRPO groups).
    """
    from tqdm import tqdm
    counts = counts if counts is not None else Counter()
    stop_ids, pad_id = stop_token_ids(tokenizer), tokenizer.pad_token_id
    if seed is not None:
        torch.manual_seed(seed)
    trajs = []
    for i, p in enumerate(prompts):
        prompt_ids = render_prompt_ids(tokenizer, p["prompt"])
        trajs += [Trajectory(prompt_ids=prompt_ids, prompt_index=i, data_source=p["data_source"],
                             ground_truth=p["ground_truth"])
                  for _ in range(n)]
    live = list(trajs)
    # transient tool failures, when cfg asks for them
    flaky = random.Random(None if seed is None else seed + 17)
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
            first = calls[0]
            turn["tool_call"] = (first["arguments"].get("code") if isinstance(first["arguments"], dict)
                                 else first)
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
            sandbox_failure = cfg.tool_failure_rate > 0 and flaky.random() < cfg.tool_failure_rate
            if sandbox_failure:
                # what the reference shows for a sandbox timeout or failure
                texts = [tools.NO_STDOUT] * len(texts)
            failed = any(tools.tool_call_failed(x) for x in texts)
            t.num_tool_calls += len(calls)
            t.num_tool_errors += int(failed)
            counts["tool_calls"] += len(calls)
            counts["tool_errors"] += int(failed)
            t.turns[-1].update(tool_status="error" if failed else "ok", sandbox_failure=sandbox_failure,
                               tool_output_chars=sum(map(len, texts)),
                               tool_output_truncated="...(truncated)..." in "".join(texts))
            segment = render_tool_response_ids(tokenizer, texts, cfg.tool_junction)
            if len(t.response_ids) + len(segment) >= cfg.max_response_tokens:
                # stop *without* appending: a trajectory always ends with a model turn
                _finish(t, "length", cfg)
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
    """Tool texts for a turn's calls, run in parallel. With cfg.dedupe_tool_calls, identical calls (the n
    samples of a prompt often write the same code) run once and share the answer: exact for deterministic
    code."""
    if not calls:
        return []
    keys = [json.dumps(c, sort_keys=True) for c in calls]
    unique = list(dict.fromkeys(keys)) if cfg.dedupe_tool_calls else keys
    by_key = {k: c for k, c in zip(keys, calls)}
    texts = tools.run_tool_calls([by_key[k] for k in unique],
                                 timeout=cfg.tool_timeout, memory_mb=cfg.tool_memory_mb,
                                 autoprint=cfg.autoprint, max_output_chars=cfg.max_tool_response_chars,
                                 sandbox=cfg.sandbox, sandbox_url=cfg.sandbox_url)
    if not cfg.dedupe_tool_calls:
        return texts
    answer = dict(zip(unique, texts))
    return [answer[k] for k in keys]


def score_trajectory(t: Trajectory, tokenizer, cfg: RolloutConfig):
    """Reward from the decoded response (tool segments included, special tokens skipped), as the reference."""
    t.text = tokenizer.decode(t.response_ids, skip_special_tokens=True)
    result = tools.compute_score(t.data_source, t.text, t.ground_truth, {"num_turns": t.num_turns},
                                 tool_shaping=cfg.tool_shaping, lenient_math=cfg.math_scoring == "lenient",
                                 code_scoring=cfg.code_scoring, sandbox=cfg.sandbox,
                                 sandbox_url=cfg.sandbox_url)
    t.score, t.acc, t.pred = float(result["score"]), bool(result["acc"]), result["pred"] or ""
    t.reward = t.score + overlong_penalty(len(t.response_ids), cfg.max_response_tokens,
                                          cfg.overlong_buffer, cfg.overlong_penalty)


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
# 7. Runs: one process or many, an output folder of one's own, checkpoints that survive a kill
#
#   out_dir/.lock                    held (flock) for the life of the run; says who holds it
#   out_dir/run.json                 the run's settings, code version and run id
#   out_dir/checkpoint-000010/       a complete checkpoint: a Hugging Face folder (full weights, tokenizer)
#                                    plus trainer/ (model and optimizer, sharded,
#                                    torch.distributed.checkpoint) and
#                                    trainer_state.pt (step, RNG, run id, scheduler)
#   out_dir/latest                   the name of the newest complete checkpoint
#   out_dir/metrics.jsonl ...        one row per step, each with the run id
#   out_dir/final/                   the trained model (Hugging Face folder) and run.json
#
# A checkpoint is written whole under .checkpoint-N.tmp/ and then renamed: a kill at any instant leaves either
# no new checkpoint or a complete one, and the older one is deleted only after the new one is in place.

MAX_NONFINITE_IN_A_ROW = 3  # optimizer steps skipped for a non-finite gradient norm before the run stops


@dataclass
class Dist:
    """Where this process sits. `python FILE.py` is rank 0 of 1 and nothing distributed runs; under torchrun
    (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the collectives below use the default process group."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_processes(device: str = "") -> tuple[Dist, str]:
    """(Dist, device) for this process; starts the process group under torchrun and says once how the run is
    laid out."""
    device = device or default_device()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        log.info("one process, device %s", device)
        return Dist(), device
    import torch.distributed as dist
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if d.main:
        log.info("world size %d, rank %d, local rank %d, backend %s, device %s", d.world, d.rank,
                 d.local_rank, dist.get_backend(), device)
    else:
        logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0 logs, the others only warn
    return d, device


def shard(model, d: Dist, device: str):
    """FSDP2: every decoder layer and then the whole model sharded over the ranks (bf16 compute with fp32
    reductions on GPU, fp32 on CPU). One process: the model as it is."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.startswith("cuda") else None)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=mp or MixedPrecisionPolicy())
    return model


def full_state_dict(model, d: Dist, everywhere: bool = False) -> dict:
    """The unsharded weights: on rank 0 (on CPU), or on every rank with `everywhere` (for a weight push)."""
    if d.world == 1:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model,
                                options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def all_gather(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: dict, d: Dist) -> dict:
    """Every value summed over the ranks (same keys on every rank)."""
    if d.world == 1:
        return dict(values)
    return {k: sum(v[k] for v in all_gather(values, d)) for k in values}


def barrier(d: Dist):
    if d.world > 1:
        import torch.distributed as dist
        dist.barrier()


def my_share(n: int, d: Dist) -> range:
    """This rank's contiguous part of range(n): the ranks' parts differ in size by at most one."""
    per, extra = divmod(n, d.world)
    start = d.rank * per + min(d.rank, extra)
    return range(start, start + per + (d.rank < extra))


def micro_batches(rows: list[int], size: int, count: int) -> list[list[int]]:
    """`rows` cut into `count` micro-batches of at most `size`; the last ones may be empty. Every rank of a
    sharded model runs the same number of forward passes (each one is a collective), so short ranks run empty
    ones."""
    return [rows[i * size:(i + 1) * size] for i in range(count)]


def n_micro_batches(largest_share: int, size: int) -> int:
    return max(1, -(-largest_share // size))


_locks = {}  # out_dir -> its open lock file: a lock lives as long as this process


def lock_out_dir(out_dir: Path, d: Dist):
    """One run per out_dir: an exclusive flock on out_dir/.lock, released by the kernel when the process ends
    (a process that runs several stages one after another, like pipeline.py, keeps the locks it took)."""
    if not d.main or str(out_dir.resolve()) in _locks:
        return
    import fcntl
    import socket
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        raise SystemExit(f"{out_dir} is in use by {holder}. Wait for that run to end, stop it, or choose "
                         "another --out_dir. (The lock dies with its process; "
                         "on a filesystem without working locks, "
                         f"delete {path} once you are sure no run is using the folder.)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({' '.join(sys.argv)[:300]})\n")
    f.flush()
    _locks[str(out_dir.resolve())] = f


def code_version() -> str:
    """A hash of the repository's code and toy files: a stage made by other code is not reused."""
    import hashlib
    h = hashlib.sha256()
    files = sorted([*REPO_DIR.glob("*.py"), *TOY_DIR.glob("*.py"),
                    *TOY_DIR.glob("*.json"), *TOY_DIR.glob("tokenizer/*")])
    for p in files:
        h.update(p.relative_to(REPO_DIR).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once it is whole)."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint; the `latest` pointer first, then the newest folder, with a warning if
    they disagree."""
    found = [p for p in checkpoints(out_dir) if (p / "trainer_state.pt").exists()]
    if not found:
        return None
    pointer = out_dir / "latest"
    named = out_dir / pointer.read_text().strip() if pointer.exists() else None
    if named is not None and named != found[-1]:
        log.warning("%s names %s, but the newest complete checkpoint is %s: using that",
                    pointer, named.name, found[-1].name)
    return found[-1]


def start_or_resume(out_dir: Path, resume: bool, d: Dist, logs: list[str]) -> tuple[Path | None, dict | None]:
    """What a run starts from: (checkpoint folder, its trainer state) or (None, None). Runs on every rank.

    With resume, the newest complete checkpoint; without one, a loud warning naming what the folder holds.
    The logs are cut back to the checkpoint's step, so that a resumed run writes every step once. A run that
    does not resume starts clean: earlier checkpoints, logs and final/ of this out_dir are removed."""
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and d.main:
        held = sorted(p.name for p in out_dir.iterdir() if p.name != ".lock") if out_dir.exists() else []
        log.warning("--resume: no complete checkpoint in %s (it holds: %s); starting from step 0",
                    out_dir, ", ".join(held) or "nothing")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False) if ckpt else None
    barrier(d)
    if d.main:
        for tmp in out_dir.glob(".checkpoint-*.tmp"):  # an interrupted save
            shutil.rmtree(tmp, ignore_errors=True)
        if ckpt is None:
            stale = [p for p in [*checkpoints(out_dir), out_dir / "final", out_dir / "latest"] if p.exists()]
            if stale:
                log.warning("starting fresh in %s: removing %s of an earlier run",
                            out_dir, ", ".join(p.name for p in stale))
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        trim_logs(out_dir, state["step"] if state else -1, logs)
    barrier(d)
    return ckpt, state


def trim_logs(out_dir: Path, step: int, names: list[str]):
    """Keep the rows of each JSONL log up to `step` (their "step" or "rl_step"); -1 empties them."""
    for name in names:
        path = out_dir / name
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", row.get("rl_step", 0)) <= step:
                keep.append(line + "\n")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def new_run(out_dir: Path, cfg, state: dict | None, d: Dist) -> str:
    """The run id (kept across resumes), and out_dir/run.json with the settings and the code version."""
    run_id = (state["run_id"] if state and "run_id" in state
              else f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    run_id = all_gather(run_id, d)[0]
    if d.main:
        info = {"run_id": run_id, "code_version": code_version(), "world_size": d.world,
                "config": asdict(cfg)}
        (out_dir / "run.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    return run_id


def _save_hf(path: Path, model, tokenizer, state_dict: dict):
    # a gathered state dict holds a tied weight twice (the output head is the embedding): keep one, as HF does
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _no_space(e: Exception, where: Path, intact: str):
    """A full disk, also when a library wraps the OSError in its own exception, stops the run saying so."""
    import errno
    wrapped = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]  # per rank
    causes = [e, *wrapped, e.__cause__, e.__context__]
    if any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in causes):
        raise SystemExit(f"no space left on the device while writing {where}; {intact}") from None
    raise e


def seed_everything(seed: int):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


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


def ready_to_train(model, ckpt: Path | None, d: Dist, device: str, make_optimizer,
                   grad_checkpointing: bool = False):
    """(model, optimizer) to train: the model (fp32 master weights) sharded over the ranks, its optimizer,
    and, when resuming, the model and optimizer state of checkpoint `ckpt` (saved by any number of ranks)."""
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    model = shard(model, d, device).train()
    optimizer = make_optimizer(model.parameters())
    if ckpt is not None:
        load_checkpoint(ckpt, model, optimizer, d)
        log.info("resumed from %s", ckpt)
    return model, optimizer


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, optimizer, d: Dist, state: dict):
    """out_dir/checkpoint-{step}: written whole under a temporary name, then renamed; older ones removed
    after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    name = f"checkpoint-{step:06d}"
    tmp, final = out_dir / f".{name}.tmp", out_dir / name
    previous = latest_checkpoint(out_dir)
    intact = f"the last complete checkpoint ({previous.name if previous else 'none yet'}) is intact"
    try:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(d)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "trainer"),
                 no_dist=d.world == 1)
        weights = full_state_dict(model, d)
        if d.main:
            _save_hf(tmp, model, tokenizer, weights)
            torch.save(state, tmp / "trainer_state.pt")  # written last: its presence marks a complete folder
        barrier(d)
        if d.main:
            shutil.rmtree(final, ignore_errors=True)  # a leftover of a run that was not resumed
            os.replace(tmp, final)                    # the commit point
            pointer = out_dir / ".latest.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, out_dir / "latest")
            for old in checkpoints(out_dir)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        # torch.distributed.checkpoint wraps a full disk in a CheckpointException (a BaseException)
        _no_space(e, tmp, intact)
    barrier(d)


def load_checkpoint(ckpt: Path, model, optimizer, d: Dist):
    """Model and optimizer state from a checkpoint's trainer/ folder, into a model sharded over any number of
    ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(sd, checkpoint_id=str(ckpt / "trainer"), no_dist=d.world == 1)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


def save_final(out_dir: Path, model, tokenizer, d: Dist):
    """out_dir/final: the trained model as a Hugging Face folder, with run.json; written whole, then
    renamed."""
    weights = full_state_dict(model, d)
    if d.main:
        tmp, final = out_dir / ".final.tmp", out_dir / "final"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            _save_hf(tmp, model, tokenizer, weights)
            if (out_dir / "run.json").exists():
                shutil.copy(out_dir / "run.json", tmp / "run.json")
            # a kill here leaves no final/: the last checkpoint resumes
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:
            _no_space(e, tmp, "the last checkpoint is intact; resume to write final/ again")
    barrier(d)


def optimizer_step(optimizer, model, grad_clip: float, health: Counter) -> float:
    """Clip and step, unless the gradient norm is not finite: then the update is skipped (as verl does) and
    counted; MAX_NONFINITE_IN_A_ROW such steps in a row stop the run. Returns the gradient norm."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if np.isfinite(grad_norm):
        optimizer.step()
        health["in_a_row"] = 0
    else:
        health["skipped"] += 1
        health["in_a_row"] += 1
        log.warning("gradient norm %s: optimizer step skipped (%d so far)", grad_norm, health["skipped"])
        if health["in_a_row"] >= MAX_NONFINITE_IN_A_ROW:
            raise SystemExit(f"{health['in_a_row']} optimizer steps in a row had a non-finite gradient norm: "
                             "stopping. "
                             "Lower the learning rate, or check the data and the starting checkpoint.")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def quiet_libraries():
    """transformers' per-load progress bars and notices would drown each stage's own output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_script(main, cls):
    """What `python FILE.py` does: flags -> config -> main, with logging, and a one-line stop on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_libraries()
    cfg = parse_args(cls)
    try:
        main(cfg)
    except KeyboardInterrupt:
        argv = [a for a in sys.argv[1:] if a not in ("--resume", "--no-resume")]
        resume = "" if not any(f.name == "resume" for f in fields(cls)) else " --resume"
        print(f"\ninterrupted; resume with: "
              f"python {Path(sys.argv[0]).name} {' '.join(argv)}{resume}".rstrip(),
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


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
    tokenizer = load_tokenizer(args.model)
    backend = resolve_backend(args.backend)
    engine = (make_vllm_engine(args.model, seed=args.seed) if backend == "vllm"
              else load_model(args.model, seed=args.seed))
    prompts = load_prompts(args.data, args.num_prompts, seed=args.seed)
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
