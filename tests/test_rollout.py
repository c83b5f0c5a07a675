"""rollout.py: the tool loop, its token bookkeeping, the chat-template rendering, log-probs, the toy task."""
import json
import random
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import rollout
import tools
from common import data, engines, models, sandbox
from toy import task

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("toy-student")


@pytest.fixture(scope="module")
def student():
    return models.load_model("toy-student", device="cpu")


# -----------------------------------------------------------------------------
# log-probs

def test_token_logprobs_equal_naive_log_softmax(student):
    ids = torch.randint(0, 900, (3, 40))
    att = torch.ones_like(ids)
    att[1, 30:] = 0
    with torch.no_grad():
        ours = rollout.token_logprobs(student, ids, att, max_chunk_tokens=7)       # many small chunks
        logits = student(input_ids=ids, attention_mask=att).logits.float()
        naive = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert ours.shape == (3, 39)
    assert torch.allclose(ours[att[:, 1:] > 0], naive[att[:, 1:] > 0], atol=1e-5)


def test_token_entropy_equals_naive_entropy_and_leaves_logprobs_unchanged(student):
    ids = torch.randint(0, 900, (2, 30))
    with torch.no_grad():
        lp, entropy = rollout.token_logprobs(student, ids, torch.ones_like(ids), max_chunk_tokens=7,
                                             with_entropy=True)
        logp = student(input_ids=ids).logits[:, :-1].float().log_softmax(-1)                 # [B, T-1, V]
        naive = -(logp.exp() * logp).sum(-1)
    assert entropy.shape == (2, 29) and (entropy > 0).all()
    assert torch.allclose(entropy, naive, atol=1e-4)
    assert torch.equal(lp, rollout.token_logprobs(student, ids, torch.ones_like(ids), max_chunk_tokens=7))


def test_token_logprobs_temperature_divides_logits(student):
    ids = torch.randint(0, 900, (2, 12))
    with torch.no_grad():
        ours = rollout.token_logprobs(student, ids, torch.ones_like(ids), temperature=0.7)
        naive = ((student(input_ids=ids).logits[:, :-1] / 0.7).log_softmax(-1)
                 .gather(-1, ids[:, 1:, None]).squeeze(-1))
    assert torch.allclose(ours, naive, atol=1e-5)


def test_token_logprobs_memory_stays_under_1gb_at_qwen3_vocabulary():
    """B=1, T=4096, V=151936: a full float32 log-softmax alone would be 2.5 GB."""
    script = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, %r)
        import rollout
        from transformers import Qwen3Config, Qwen3ForCausalLM
        cfg = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096)
        model = Qwen3ForCausalLM(cfg).eval()
        ids = torch.randint(0, 151936, (1, 4096))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            lp = rollout.token_logprobs(model, ids, torch.ones_like(ids))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024, lp.shape[1])
    """ % str(REPO))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    extra_mb, width = out.stdout.split()
    print(f"peak extra memory: {float(extra_mb):.0f} MB")
    assert int(width) == 4095 and float(extra_mb) < 1024


# -----------------------------------------------------------------------------
# rendering: rollouts have the chat template's token ids

def conversation():
    return [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "a = 12 * 3\nb = a + 4\nWhat is b?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "code_interpreter", "arguments": {"code": "print(12 * 3)"}}}]},
        {"role": "tool", "content": "36\n"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "code_interpreter", "arguments": {"code": "print(36 + 4)"}}}]},
        {"role": "tool", "content": "40\n"},
        {"role": "assistant", "content": "The answer is \\boxed{40}."},
    ]


def test_rendered_conversation_has_the_chat_template_ids(tok):
    """prompt + model turns + tool segments, each tokenized alone, equal the template's whole rendering."""
    msgs = conversation()
    full_text = tok.apply_chat_template(msgs, tools=[tools.TOOL_SCHEMA], tokenize=False)
    full = tok.encode(full_text, add_special_tokens=False)
    prompt_text = tok.apply_chat_template(msgs[:2], tools=[tools.TOOL_SCHEMA], tokenize=False,
                                          add_generation_prompt=True)
    ids = tok.encode(prompt_text, add_special_tokens=False)
    # what the model writes in each turn, as the template renders it (with <|im_end|>)
    turn_texts = full_text[len(prompt_text):].split("<|im_start|>assistant\n")
    for k, turn in enumerate(turn_texts):
        model_part = turn.split("<|im_end|>")[0] + "<|im_end|>"
        ids += tok.encode(model_part, add_special_tokens=False)
        if k < 2:
            ids += rollout.render_tool_response_ids(tok, [msgs[3 + 2 * k]["content"]])
    # the only difference: the template ends with "<|im_end|>\n", a rollout stops at <|im_end|>
    assert ids == full[:-1] and tok.decode(full[-1:]) == "\n"


def test_a_tool_segment_is_what_the_template_adds_for_the_tool_message_without_a_default_system_block():
    """A Qwen2.5-style template renders a default system block ("You are Qwen, ...") for any conversation that
    has none, a lone tool message too. The segment appended after a tool call is the tool message's rendering
    minus the empty conversation's, as the authors cut it: exactly what the template adds to a conversation
    for that message, and no second system block."""
    tok = models.load_tokenizer("toy-student", str(REPO / "tests" / "templates" / "qwen2_5.jinja"))
    call = {"type": "function", "function": {"name": "code_interpreter", "arguments": {"code": "print(6 * 7)"}}}
    before = [{"role": "user", "content": "What is 6 * 7?"},
              {"role": "assistant", "content": "", "tool_calls": [call]}]
    with_tool = before + [{"role": "tool", "content": "42"}]
    text_before = tok.apply_chat_template(before, tools=[tools.TOOL_SCHEMA], tokenize=False)
    text_after = tok.apply_chat_template(with_tool, tools=[tools.TOOL_SCHEMA], tokenize=False,
                                         add_generation_prompt=True)
    assert text_after.startswith(text_before) and text_before.endswith("<|im_end|>\n")
    added = text_after[len(text_before):]                       # <|im_start|>user ... <|im_start|>assistant\n
    assert "You are Qwen" in tok.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)
    segment = tok.decode(rollout.render_tool_response_ids(tok, ["42"], "reference"))
    assert segment == added and "You are Qwen" not in segment
    assert tok.decode(rollout.render_tool_response_ids(tok, ["42"], "template")) == "\n" + added


def test_prompt_declares_the_tool_as_the_reference(tok):
    text = tok.decode(rollout.render_prompt_ids(tok, "hi"))
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert json.dumps(tools.TOOL_SCHEMA, ensure_ascii=False) in text
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# -----------------------------------------------------------------------------
# the tool loop, driven by a scripted policy

def scripted(tok, replies):
    """An engine that answers turn k of every trajectory with replies[k] (a string), and counts its calls."""
    calls = Counter()

    def engine(contexts, max_new_tokens, sampling, seeds):
        calls["batches"] += 1
        outs = []
        for ctx, budget in zip(contexts, max_new_tokens):
            turn = tok.decode(ctx).count("<|im_start|>assistant")  # 1 for the first turn
            outs.append(tok.encode(replies[min(turn - 1, len(replies) - 1)],
                                   add_special_tokens=False)[:budget])
        return outs
    return engine, calls


def call_text(code):
    return ('<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "%s"}}\n</tool_call><|im_end|>'
            % code)


def test_tool_loop_builds_response_and_mask(tok):
    engine, calls = scripted(tok, [call_text("print(6 * 7)"), "The answer is \\boxed{42}.<|im_end|>"])
    prompts = [data.Prompt("q", "toy_arith", "42")]
    (t,) = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig(max_response_tokens=200))
    assert (t.acc and t.reward == 1.0 and t.num_turns == 4 and t.num_tool_calls == 1
            and t.stop_reason == "answer")
    tool_text = tok.decode([i for i, m in zip(t.response_ids, t.response_mask) if m == 0])
    assert tool_text == ("\n<|im_start|>user\n<tool_response>\n42\n\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert len(t.steps) == 2 and all(all(t.response_mask[s:e]) for s, e in t.steps)
    assert t.turns[0].tool_call == "print(6 * 7)" and t.turns[0].tool_status == "ok"


def test_generation_is_batched_across_trajectories(tok):
    engine, calls = scripted(tok, [call_text("print(1)"), call_text("print(2)"), "done \\boxed{2}<|im_end|>"])
    prompts = [data.Prompt(f"q{i}", "toy_arith", "2") for i in range(8)]
    trajs = rollout.rollout(engine, tok, prompts, 4, rollout.RolloutConfig(max_response_tokens=300,
                                                                           batch_wait_s=60))
    assert len(trajs) == 32 and calls["batches"] == 3   # with fast tools, one generate call per turn
    assert [t.prompt_index for t in trajs] == [i for i in range(8) for _ in range(4)]


def test_max_turns_stops_the_loop(tok):
    engine, _ = scripted(tok, [call_text("print(1)")])
    prompts = [data.Prompt("q", "toy_arith", "1")]
    (t,) = rollout.rollout(engine, tok, prompts, 1,
                           rollout.RolloutConfig(max_turns=3, max_response_tokens=2000))
    assert len(t.steps) == 3 and t.num_tool_calls == 2 and t.stop_reason == "max_turns"
    assert t.response_mask[-1] == 1   # ends with a model turn


def test_token_budget_counts_tool_tokens_and_never_ends_on_a_tool_segment(tok):
    engine, _ = scripted(tok, [call_text("print(123456789)")])
    prompts = [data.Prompt("q", "toy_arith", "1")]
    (t,) = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig(max_response_tokens=100))
    assert len(t.response_ids) <= 100 and t.stop_reason == "length" and t.response_mask[-1] == 1


def test_malformed_and_unknown_tool_calls_follow_the_reference(tok):
    bad_json = "<tool_call>\n{not json}\n</tool_call><|im_end|>"
    engine, _ = scripted(tok, [bad_json])
    prompts = [data.Prompt("q", "toy_arith", "1")]
    counts = Counter()
    (t,) = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig(), counts=counts)
    assert t.stop_reason == "answer" and counts["tool_calls_dropped"] == 1   # no valid call: the episode ends
    unknown = '<tool_call>\n{"name": "web_search", "arguments": {"q": "x"}}\n</tool_call><|im_end|>'
    engine, _ = scripted(tok, [unknown, "\\boxed{1}<|im_end|>"])
    (t,) = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig())
    assert "Error when executing tool" in t.text and t.num_tool_errors == 1 and t.acc


@pytest.mark.parametrize("source, dedupe, shared", [("toy_arith", "auto", True), ("math_dapo", "auto", False),
                                                    ("math_dapo", "on", True), ("toy_arith", "off", False)])
def test_identical_tool_calls_share_an_answer_only_where_the_code_is_deterministic(tok, source, dedupe,
                                                                                   shared):
    """auto: the toy's arithmetic runs once per distinct call of a turn; other data runs every call, as the
    authors do (here: four samples sending the same unseeded random draw)."""
    engine, _ = scripted(tok, [call_text("print(__import__('random').random())"), "\\boxed{1}<|im_end|>"])
    prompts = [data.Prompt("q", source, "1")]
    trajs = rollout.rollout(engine, tok, prompts, 4, rollout.RolloutConfig(dedupe_tool_calls=dedupe))
    outputs = {tok.decode([i for i, m in zip(t.response_ids, t.response_mask) if m == 0]) for t in trajs}
    assert len(outputs) == (1 if shared else 4)


def test_rollout_of_the_toy_student_with_hf_generate(tok, student):
    prompts = rollout.load_prompts("toy:eval", 4)
    trajs = rollout.rollout(student, tok, prompts, 2, rollout.RolloutConfig(max_response_tokens=64), seed=0)
    assert len(trajs) == 8 and all(len(t.response_ids) <= 64 for t in trajs)
    again = rollout.rollout(student, tok, prompts, 2, rollout.RolloutConfig(max_response_tokens=64), seed=0)
    assert [t.response_ids for t in trajs] == [t.response_ids for t in again]   # seeded: reproducible


def test_pad_trajectories_puts_the_mask_in_label_space(tok):
    t = rollout.Trajectory(prompt_ids=[5, 6, 7], response_ids=[8, 9, 10, 11], response_mask=[1, 1, 0, 1])
    batch = rollout.pad_trajectories([t], tok.pad_token_id)
    # label position p-1 predicts token p: response token j sits at position 3 + j
    assert batch.response_mask.tolist() == [[0, 0, 1, 1, 0, 1]]



# -----------------------------------------------------------------------------
# the schedule: each trajectory at its own pace, the same trajectories as turn by turn

def random_policy(tok):
    """An engine that draws each turn from the request's own seed: a tool call (70%) or an answer. It records
    the requests of every batch."""
    batches = []

    def engine(contexts, max_new_tokens, sampling, seeds):
        batches.append(list(seeds))
        outs = []
        for budget, seed in zip(max_new_tokens, seeds):
            rng = random.Random(seed)
            text = (call_text(f"print({rng.randrange(1000)})") if rng.random() < 0.7
                    else "\\boxed{%d}<|im_end|>" % rng.randrange(10))
            outs.append(tok.encode(text, add_special_tokens=False)[:budget])
        return outs
    return engine, batches


WAIT = {"turn by turn": float("inf"), "async": 0.5}  # --batch_wait_s: every trajectory, or the default


def test_the_schedule_does_not_change_what_is_sampled(tok):
    """Seeded per trajectory and turn, the asynchronous loop gives the turn-synchronous loop's trajectories,
    although slow calls (30% of the turns, 0.3 s) and sandbox failures reorder what is generated when."""
    prompts = [data.Prompt(f"q{i}", "toy_arith", "1") for i in range(4)]
    runs = {}
    for schedule in ("turn by turn", "async"):
        engine, batches = random_policy(tok)
        cfg = rollout.RolloutConfig(batch_wait_s={**WAIT, "async": 0.1}[schedule], tool_latency_rate=0.3,
                                    tool_latency_s=0.3, tool_failure_rate=0.2, dedupe_tool_calls="off",
                                    max_turns=6)
        trajs = rollout.rollout(engine, tok, prompts, 4, cfg, seed=5)
        runs[schedule] = ([t.response_ids for t in trajs], [t.log_record() for t in trajs], batches)
    assert runs["async"][0] == runs["turn by turn"][0] and runs["async"][1] == runs["turn by turn"][1]
    sync_batches, async_batches = runs["turn by turn"][2], runs["async"][2]
    assert sorted(map(sorted, sync_batches)) != sorted(map(sorted, async_batches))  # the schedules differed
    assert len(async_batches) > len(sync_batches)


def test_a_slow_call_does_not_hold_the_other_trajectories(tok):
    """One trajectory's call sleeps 3 s: asynchronously the four others go on without it (a batch of four
    turns while it sleeps); turn by turn, every batch waits for all five."""
    slow = call_text("import time\\ntime.sleep(3)\\nprint(1)")
    prompts = [data.Prompt(f"q{i}", "toy_arith", "1") for i in range(5)]
    sizes = {}
    for schedule in ("turn by turn", "async"):
        seen = []

        def engine(contexts, max_new_tokens, sampling, seeds):
            seen.append(len(contexts))
            outs = []
            for ctx in contexts:
                text = tok.decode(ctx)
                turn = text.count("<|im_start|>assistant")
                reply = (slow if "q0" in text else call_text("print(1)")) if turn == 1 else "\\boxed{1}<|im_end|>"
                outs.append(tok.encode(reply, add_special_tokens=False))
            return outs
        trajs = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig(batch_wait_s=WAIT[schedule],
                                                                                tool_timeout=10))
        assert all(t.acc and t.num_tool_calls == 1 for t in trajs)
        sizes[schedule] = seen
    assert sizes["turn by turn"] == [5, 5]
    assert sizes["async"] == [5, 4, 1]


class _SlowFirstTurn:
    """A continuous engine (as vLLM's): a request joins the running batch at the next step and comes back
    when it ends. Trajectory q0's first turn takes 40 steps of 0.05 s, every other turn one step."""
    continuous = True

    def __init__(self, tok):
        self.tok, self.running, self.added = tok, [], []

    def add(self, requests):
        self.added.append(len(requests))
        for r in requests:
            text = self.tok.decode(r.context)
            first = text.count("<|im_start|>assistant") == 1
            reply = call_text("print(1)") if first else "\\boxed{1}<|im_end|>"
            self.running.append([40 if first and "q0" in text else 1, r.future,
                                 self.tok.encode(reply, add_special_tokens=False)])

    def busy(self):
        return bool(self.running)

    def step(self):
        time.sleep(0.05)
        for r in self.running:
            r[0] -= 1
        done = [(future, ids) for left, future, ids in self.running if left == 0]
        self.running = [r for r in self.running if r[0] > 0]
        return done


def test_a_continuous_engine_takes_whole_turns_and_does_not_wait_for_a_long_generation(tok):
    """With fast tools a continuous engine is sent what the turn-by-turn loop would batch; while one long
    generation runs, the others' next turns join it once no request has come for --batch_wait_s."""
    prompts = [data.Prompt(f"q{i}", "toy_arith", "1") for i in range(5)]
    added = {}
    for name, cfg in {"turn by turn": rollout.RolloutConfig(batch_wait_s=float("inf")),
                      "async": rollout.RolloutConfig(batch_wait_s=0.3),
                      "async, patient": rollout.RolloutConfig(batch_wait_s=60)}.items():
        engine = _SlowFirstTurn(tok)
        trajs = rollout.rollout(engine, tok, prompts, 1, cfg)
        assert all(t.acc and t.num_tool_calls == 1 for t in trajs)
        added[name] = engine.added
    assert added == {"turn by turn": [5, 5], "async": [5, 4, 1], "async, patient": [5, 5]}


def test_a_batch_holds_its_rows_in_trajectory_order_whatever_call_ended_first(tok):
    """The first trajectories' calls end last; the next batch still lists the trajectories in their order,
    so a row's place in the matrix products (and so its floats) does not depend on the tool's timing."""
    prompts = [data.Prompt(f"q{i}", "toy_arith", "1") for i in range(4)]
    orders = []

    def engine(contexts, max_new_tokens, sampling, seeds):
        texts = [tok.decode(ctx) for ctx in contexts]
        orders.append([next(i for i in range(4) if f"q{i}" in text) for text in texts])
        outs = []
        for i, text in zip(orders[-1], texts):
            sleep = f"import time\\ntime.sleep({0.3 * (3 - i):.1f})\\nprint(1)"
            reply = call_text(sleep) if text.count("<|im_start|>assistant") == 1 else "\\boxed{1}<|im_end|>"
            outs.append(tok.encode(reply, add_special_tokens=False))
        return outs
    trajs = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig(batch_wait_s=5, tool_timeout=10))
    assert all(t.acc for t in trajs)
    assert orders == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_hf_sampling_with_request_seeds_does_not_depend_on_the_batch(tok, student):
    """Each request's tokens come from its own seed: alone, in a batch, or in another order, the same ids."""
    contexts = [rollout.render_prompt_ids(tok, q) for q in ("a = 3 * 4", "b = 12 % 5", "hi")]
    stop = models.stop_token_ids(tok)

    def sample(idx):
        return engines.generate_hf(student, [contexts[i] for i in idx], [30] * len(idx), 1.0, 0.9, stop,
                                   tok.pad_token_id, seeds=[100 + i for i in idx])
    together = sample([0, 1, 2])
    assert [sample([i])[0] for i in range(3)] == together
    assert sample([2, 0, 1]) == [together[2], together[0], together[1]]
    other = engines.generate_hf(student, contexts, [30] * 3, 1.0, 0.9, stop, tok.pad_token_id, seeds=[7, 8, 9])
    assert other != together

# -----------------------------------------------------------------------------
# models, data, the toy task

def test_teacher_and_student_must_share_a_tokenizer(tok, tmp_path):
    models.check_same_tokenizer(tok, models.load_tokenizer("toy-teacher"))
    other = models.load_tokenizer("toy-student")
    other.add_tokens(["<extra_token>"])
    with pytest.raises(SystemExit, match="tokenizer mismatch"):
        models.check_same_tokenizer(tok, other)


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(SystemExit, match="does not exist"):
        models.load_model("runs/no-such-model/final")


def test_prompt_wrappers_are_chosen_per_row():
    rows = [
        {"prompt": [{"role": "user", "content": "P"}], "data_source": "math_dapo",
         "reward_model": {"ground_truth": "1"}},
        {"prompt": [{"role": "user", "content": "P"}], "data_source": "skywork_code",
         "reward_model": {"ground_truth": {}}},
        {"prompt": [{"role": "user", "content": "P"}], "data_source": "other",
         "reward_model": {"ground_truth": "2"}},
        {"Problem": "P", "Answer": 7, "data_source": "AIME2024"},
        {"problem": "P", "solution": "B", "domain": "Physics", "data_source": "gpqa_diamond"},
    ]
    texts = [user_text(data.wrap_prompt(r)[0]) for r in rows]
    assert texts[0] == "P" + data.NOUNITS_A
    assert texts[1] == "P" + data.AGENT + data.CODE_SUFFIX
    assert texts[2] == (data.MATH1 + "P" + data.MATH2 + data.AGENT + data.ANSFMT
                        + data.NOUNITS_B)
    assert texts[3] == data.MATH1 + "P" + data.MATH2 + data.AGENT + data.ANSFMT
    assert texts[4].startswith("Analyze and solve the following Physics problem step by step. \n\nP")
    assert data.wrap_prompt(rows[3])[2] == "7"


def test_broken_rows_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "rl.jsonl"
    good = {"prompt": [{"role": "user", "content": "P"}], "data_source": "x",
            "reward_model": {"ground_truth": "1"}}
    path.write_text("\n".join([json.dumps(good), json.dumps({"foo": 1}), json.dumps(good)]))
    assert len(data.load_prompts(str(path))) == 2
    assert "skipped 1 malformed rows" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        data.load_prompts(str(bad))


def user_text(messages):
    """The content of a prompt's user message."""
    (text,) = [m["content"] for m in messages if m["role"] == "user"]
    return text


SYSTEM = {"role": "system", "content": "You are a careful solver."}


def test_prompts_keep_their_messages_and_the_wrapper_edits_the_user_message(tok):
    row = {"prompt": [SYSTEM, {"role": "user", "content": "What is 1+1?"}], "data_source": "math_dapo",
           "reward_model": {"ground_truth": "2"}}
    messages, _, _ = data.wrap_prompt(row)
    assert messages == [SYSTEM, {"role": "user", "content": "What is 1+1?" + data.NOUNITS_A}]
    assert row["prompt"][1]["content"] == "What is 1+1?"  # the row itself is left as it was
    text = tok.decode(rollout.render_prompt_ids(tok, messages))
    assert "You are a careful solver." in text and json.dumps(tools.TOOL_SCHEMA, ensure_ascii=False) in text
    assert text.endswith("<|im_start|>user\nWhat is 1+1?" + data.NOUNITS_A + "<|im_end|>\n<|im_start|>assistant\n")
    # the length filter measures the whole list, as the authors' filter_overlong_prompts does
    alone = data.Prompt(messages[1:], "math_dapo", "2")
    length = len(tok.encode(tok.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=True)))
    assert data.drop_long_prompts([alone, data.Prompt(messages, "math_dapo", "2")], tok, length) == [alone]


def test_wrapper_choice_file_wraps_every_row_as_the_first(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "M"}], "data_source": "math_dapo",
             "reward_model": {"ground_truth": "1"}},
            {"prompt": [{"role": "user", "content": "C"}], "data_source": "skywork_code",
             "reward_model": {"ground_truth": {"inputs": ["1"], "outputs": ["1"]}}},
            {"prompt": [{"role": "user", "content": "O"}], "data_source": "other",
             "reward_model": {"ground_truth": "2"}}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    by_row = [user_text(p.prompt) for p in data.load_prompts(str(path))]
    assert by_row == ["M" + data.NOUNITS_A, "C" + data.AGENT + data.CODE_SUFFIX,
                      data.MATH1 + "O" + data.MATH2 + data.AGENT + data.ANSFMT + data.NOUNITS_B]
    by_file = data.load_prompts(str(path), wrapper_choice="file")
    assert [user_text(p.prompt) for p in by_file] == ["M" + data.NOUNITS_A, "C" + data.NOUNITS_A,
                                                          "O" + data.NOUNITS_A]
    assert [p.data_source for p in by_file] == ["math_dapo", "skywork_code", "other"]  # graders per row
    path.write_text("\n".join(map(json.dumps, rows[::-1])))  # the first row now selects map_fn_skywork
    assert ([user_text(p.prompt) for p in data.load_prompts(str(path), wrapper_choice="file")]
            == by_row[::-1][:2] + [data.MATH1 + "M" + data.MATH2 + data.AGENT + data.ANSFMT + data.NOUNITS_B])


def test_toy_prompt_ids_are_those_of_its_one_user_message(tok):
    """A toy row has a single user message: its prompt ids are the ones a prompt of that text alone gets."""
    rows = task.rl_rows(16, "eval")
    prompts = rollout.load_prompts("toy:eval", 16)
    for row, p in zip(rows, prompts):
        (message,) = row["prompt"]
        text = tok.apply_chat_template([{"role": "user", "content": message["content"]}],
                                       tools=[tools.TOOL_SCHEMA], tokenize=False, add_generation_prompt=True)
        assert rollout.render_prompt_ids(tok, p.prompt) == tok.encode(text, add_special_tokens=False)
        assert rollout.render_prompt_ids(tok, p.prompt) == rollout.render_prompt_ids(tok, message["content"])


def test_toy_splits_are_disjoint_and_seeded():
    train = {r["prompt"][0]["content"] for r in task.rl_rows(500, "train")}
    sft_split = {r["messages"][0]["content"] for r in task.sft_rows(500)}
    valid = {r["prompt"][0]["content"] for r in task.rl_rows(200, "valid")}
    held_out = {r["prompt"][0]["content"] for r in task.rl_rows(200, "eval")}
    assert not (train | sft_split) & valid and not held_out & valid
    assert not train & held_out
    assert task.rl_rows(5, "train", seed=1) == task.rl_rows(5, "train", seed=1)


def test_toy_problems_need_dependent_tool_calls():
    rng = random.Random(0)
    for _ in range(50):
        p = task.make_problem(rng)
        assert 2 <= len(p["calls"]) <= 4
        for k in range(1, len(p["calls"])):   # each call starts from the previous call's output
            assert p["calls"][k].startswith(f"print({p['outputs'][k - 1]} ")
        assert str(p["outputs"][-1]) == p["answer"]


def test_the_toy_gap_is_an_integer_division_written_with_one_slash():
    """Half of a held-out split opens with `a = x / y`, whose call is `print(x // y)`; no other line divides."""
    rng = random.Random(0)
    for _ in range(50):
        p = task.make_problem(rng, gap=True)
        x, y = (int(v) for v in p["lines"][0].removeprefix("a = ").split(" / "))
        assert p["calls"][0] == f"print({x} // {y})" and p["outputs"][0] == x // y and y in task.GAP_DIVISORS
        assert task.has_gap(p["question"])
        assert not any("/" in line for line in p["lines"][1:]) and not any("/" in c for c in p["calls"][1:])
        assert not task.has_gap(task.make_problem(rng)["question"])
    held_out = [task.has_gap(r["prompt"][0]["content"]) for r in task.rl_rows(512, "eval")]
    assert 0.4 < np.mean(held_out) < 0.6


def test_the_students_sft_data_solves_the_gap_rarely_and_reads_slash_as_python_does_otherwise():
    def first_calls(rows):  # the first call of every conversation in the gap notation
        return [r["messages"][1]["tool_calls"][0]["function"]["arguments"]["code"] for r in rows
                if task.has_gap(r["messages"][0]["content"])]
    teacher = first_calls(task.sft_rows(2000, recovery_frac=0.0))
    assert 0.45 < len(teacher) / 2000 < 0.55 and all("//" in c for c in teacher)   # as often as the test split
    for seed in range(3):  # the same share for every seed: evenly spaced, not drawn
        student = first_calls(task.sft_rows(5000, recovery_frac=0.0, seed=seed, gap_share=0.3, gap_known=0.01))
        assert 0.13 < len(student) / 5000 < 0.17
        assert sum("//" in c for c in student) == int(0.01 * len(student))
    # the naive reading: Python's own division, and the chain it carries on, each output what Python prints
    naive = task.make_problem(random.Random(1), gap=True, naive=True)
    for call, out in zip(naive["calls"], naive["outputs"]):
        assert tools.execute_code(call) == f"{out}\n"
    x, y = (int(v) for v in naive["lines"][0].removeprefix("a = ").split(" / "))
    assert naive["calls"][0] == f"print({x} / {y})" and naive["answer"] == str(naive["outputs"][-1])
    assert task.make_problem(random.Random(1), gap=True)["answer"] != naive["answer"]


def test_toy_tracebacks_are_what_the_sandbox_prints():
    if sandbox.sandbox_isolation().level != "full":
        pytest.skip("the traceback path /tmp/main.py is the full sandbox's")
    seen = set()
    for seed in range(12):
        conv = task.sft_conversation(task.make_problem(random.Random(seed)), random.Random(seed),
                                     recovery=True)
        for i, m in enumerate(conv):
            if m["role"] == "tool" and "Traceback" in m["content"]:
                code = conv[i - 1]["tool_calls"][0]["function"]["arguments"]["code"]
                assert tools.execute_code(code) == m["content"]
                seen.add(m["content"].split("\n")[-2].split(":")[0])
    assert seen == {"NameError", "TypeError"}


def test_rollout_script_runs():
    out = subprocess.run([sys.executable, "rollout.py", "--num_prompts", "2", "--n_samples", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "4 trajectories" in out.stdout


def test_parquet_files_in_the_real_schemas_load(tmp_path):
    pd = pytest.importorskip("pandas")
    rl = tmp_path / "rl.parquet"
    pd.DataFrame([{"prompt": [{"role": "user", "content": "What is 1+1?"}], "data_source": "math_dapo",
                   "reward_model": {"ground_truth": "2"}, "extra_info": {"index": 0},
                   "ability": "math"}]).to_parquet(rl)
    (p,) = data.load_prompts(str(rl))
    assert p.prompt == [{"role": "user", "content": "What is 1+1?" + data.NOUNITS_A}]
    assert p.ground_truth == "2"
    aime = tmp_path / "aime.parquet"
    pd.DataFrame([{"Problem": "Find x.", "Answer": 204, "data_source": "AIME2024"}]).to_parquet(aime)
    (p,) = data.load_prompts(str(aime))
    assert p.ground_truth == "204" and p.data_source == "AIME2024"


def test_transient_tool_failures_show_the_reference_failure_text(tok):
    engine, _ = scripted(tok, [call_text("print(6 * 7)"), "\\boxed{42}<|im_end|>"])
    prompts = [data.Prompt("q", "toy_arith", "42")]
    (t,) = rollout.rollout(engine, tok, prompts, 1, rollout.RolloutConfig(tool_failure_rate=1.0), seed=0)
    assert "<tool_response>\nno stdout here\n</tool_response>" in tok.decode(t.response_ids)
    assert t.num_tool_errors == 1
    assert t.turns[0].tool_status == "error" and t.turns[0].sandbox_failure   # the sandbox's fault


def test_toy_retry_conversations_resend_the_failed_call():
    row = task.sft_rows(1, recovery_frac=0.0, retry_frac=1.0)[0]
    msgs = row["messages"]
    k = next(i for i, m in enumerate(msgs) if m["role"] == "tool" and m["content"] == tools.NO_STDOUT)
    assert msgs[k - 1]["tool_calls"] == msgs[k + 1]["tool_calls"]


def test_toy_direct_answers_skip_the_tool_and_keep_the_problem_set():
    rows = task.sft_rows(400, recovery_frac=0.0, seed=5, direct_frac=0.5)
    direct = [r for r in rows if len(r["messages"]) == 2]
    assert 150 < len(direct) < 250  # about half
    for r in direct:
        user, answer = r["messages"]
        assert user["role"] == "user" and answer["role"] == "assistant" and "tool_calls" not in answer
    # the same problems in the same order as without direct answers: only the solutions change
    plain = task.sft_rows(400, recovery_frac=0.0, seed=5)
    assert [r["messages"][0] for r in rows] == [r["messages"][0] for r in plain]
    for r, p in zip(rows, plain):
        if len(r["messages"]) == 2:
            assert r["messages"][1]["content"] == p["messages"][-1]["content"]  # the same boxed answer


def test_a_gpqa_row_with_an_answer_column_gets_the_gpqa_wrapper():
    # the row's data_source decides, not its columns: a GPQA row that also carries an `answer` column
    # is still a GPQA problem (the AIME layout must not capture it)
    row = {"problem": "P", "answer": "B", "solution": "B", "domain": "Chemistry",
           "data_source": "gpqa_diamond"}
    messages, source, truth = data.wrap_prompt(row)
    text = user_text(messages)
    assert source == "gpqa_diamond" and truth == "B"
    assert text.startswith("Analyze and solve the following Chemistry problem step by step.")
    assert text.endswith("into \\boxed{}")
    aime = {"problem": "P", "answer": 3, "solution": "x", "domain": "Math", "data_source": "AIME2025"}
    assert user_text(data.wrap_prompt(aime)[0]) == data.MATH1 + "P" + data.MATH2 + data.AGENT + data.ANSFMT


# -----------------------------------------------------------------------------
# generation backends: stop tokens and the vLLM engine's settings, with vLLM itself stubbed

class _StubLLM:
    """Stands in for vllm.LLM: its engine finishes each request at the next step with the token ids it was
    told to sample."""
    def __init__(self, sampled):
        self.llm_engine, self.sampled, self.params, self.added = self, list(sampled), [], []

    def add_request(self, request_id, prompt, params):
        self.params.append(params)
        self.added.append((request_id, self.sampled.pop(0)))

    def step(self):
        from types import SimpleNamespace
        done, self.added = self.added, []
        return [SimpleNamespace(request_id=r, finished=True, outputs=[SimpleNamespace(token_ids=list(ids))])
                for r, ids in done]


def test_vllm_stops_on_every_eos_id_and_appends_nothing():
    pytest.importorskip("vllm")
    im_end, endoftext = 7, 9
    sampled = [[1, 2, im_end], [1, endoftext], [1, 2, 3, 4, 5], [4, im_end, 5]]
    llm = _StubLLM(sampled)
    engine = engines.VLLMEngine(llm, rollout.RolloutConfig(), [im_end, endoftext])
    engine.add([engines.Request([0], budget, seed, k) for k, (budget, seed) in enumerate(zip([8, 8, 3, 8],
                                                                                              [11, 12, 13, 14]))])
    out = dict(engine.step())   # request k -> its turn
    # a turn keeps the stop token the model sampled, is cut at its budget, and gains no token it did not sample
    assert [out[k] for k in range(4)] == [[1, 2, im_end], [1, endoftext], [1, 2, 3], [4, im_end]]
    assert not engine.busy()
    assert all(sorted(p.stop_token_ids) == [im_end, endoftext] for p in llm.params)
    assert [p.seed for p in llm.params] == [11, 12, 13, 14]   # each request's own seed


def test_hf_generation_stops_on_every_eos_id_of_a_seeded_request(tok, student):
    """A stop set of several ids: a turn ends at the first of any of them, whichever the model samples. The
    student is made to favour the second stop id, so a loop that knew only the first would run past it."""
    first, second = tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")
    assert first != second
    model = models.load_model("toy-student", device="cpu", seed=0)
    logit_bias = torch.zeros(model.config.vocab_size)
    logit_bias[second] = 3.0            # the untrained student then writes `second` within a few dozen tokens
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + logit_bias)
    try:
        contexts = [rollout.render_prompt_ids(tok, f"q{i}") for i in range(16)]
        outs = engines.generate_hf(model, contexts, [200] * 16, 1.0, 1.0, [first, second], tok.pad_token_id,
                                   seeds=list(range(16)))
    finally:
        hook.remove()
    ended_by = [o[-1] for o in outs if o[-1] in (first, second)]
    assert second in ended_by                                   # some turns end at the second stop id ...
    for o in outs:                                              # ... and none goes past a stop id
        assert all(t not in (first, second) for t in o[:-1]) and len(o) <= 200


# -----------------------------------------------------------------------------
# the HF sampler: softmax(logits / T) with top-p, exactly, at a real vocabulary

V_QWEN3 = 151_936


def reference_distribution(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Written apart from rollout.py, in numpy float64: softmax(logits / T); with top_p < 1 the most likely
    tokens, in order, as long as the mass before each is below top_p, renormalised."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def peaked_logits(seed: int) -> np.ndarray:
    """A mode of probability ~0.9 at id 1000, a long tail, and at id 5000 (after the mode) a token of
    probability ~1e-8; id 0 can never be sampled."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-4.0, 2.0, V_QWEN3).astype(np.float32)
    logits[1000] = 14.0
    logits[0] = -np.inf
    p = reference_distribution(logits, 1.0, 1.0)
    logits[5000] = np.float32(14.0 + np.log(1e-8 / p[1000]))
    return logits


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.6), (1.3, 0.95)])
def test_hf_sampler_distribution_is_the_softmax_with_top_p_at_qwen3_vocabulary(temperature, top_p):
    logits = np.stack([peaked_logits(0), peaked_logits(1)])
    ours = engines.sampling_distribution(torch.from_numpy(logits), temperature, top_p).numpy()
    for row in range(2):
        ref = reference_distribution(logits[row], temperature, top_p)
        assert 0.5 * np.abs(ours[row] - ref).sum() < 1e-9


def interval_midpoint(p: np.ndarray, token: int) -> float:
    """The uniform at the middle of `token`'s interval of the inverse CDF in id order."""
    cdf = np.cumsum(p)
    low = cdf[token - 1] if token else 0.0
    return (low + cdf[token]) / 2 / cdf[-1]


def test_hf_sampler_picks_each_token_on_its_own_interval_even_a_1e_8_token_after_the_mode():
    logits = peaked_logits(0)
    p = reference_distribution(logits, 1.0, 1.0)
    assert 5e-9 < p[5000] < 2e-8 and p[1000] > 0.5 and p[0] == 0.0
    rng = np.random.default_rng(2)
    tokens = [1000, 5000, 1, V_QWEN3 - 1, *rng.choice(np.flatnonzero(p > 1e-7), 12)]
    u = torch.tensor([interval_midpoint(p, t) for t in tokens] + [0.0], dtype=torch.float64)
    scores = torch.from_numpy(np.tile(logits, (len(u), 1)))
    sampler = engines.SampleAtUniforms(u[:, None], start=5, temperature=1.0, top_p=1.0)
    out = sampler(torch.zeros(len(u), 5, dtype=torch.long), scores)
    picked = out.argmax(-1).tolist()
    assert torch.isfinite(out).sum(-1).tolist() == [1] * len(u)        # one finite score per row: the sample
    assert picked[:-1] == tokens
    assert picked[-1] == 1       # u = 0: the first token of positive probability, never the impossible id 0


def test_hf_sampler_never_picks_a_token_outside_the_nucleus():
    logits = peaked_logits(3)
    p = reference_distribution(logits, 1.0, 0.6)       # the mode alone holds more than 0.6
    assert np.count_nonzero(p) == 1
    u = torch.tensor([[0.0], [0.5], [1 - 2 ** -48]], dtype=torch.float64)
    out = engines.SampleAtUniforms(u, start=1, temperature=1.0, top_p=0.6)(
        torch.zeros(3, 1, dtype=torch.long), torch.from_numpy(np.tile(logits, (3, 1))))
    assert out.argmax(-1).tolist() == [1000] * 3


def test_request_uniforms_have_more_than_float32_resolution():
    u = engines.request_uniforms(7, 4096)
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert (u * 2 ** 24 != torch.floor(u * 2 ** 24)).float().mean() > 0.99  # not multiples of 2^-24
    assert torch.equal(u, engines.request_uniforms(7, 4096))


def saved_toy_config(tmp_path, **changes):
    """A model folder holding the toy student's config with `changes` (no weights: vLLM is stubbed)."""
    from transformers import AutoConfig
    model_dir = tmp_path / "m"
    AutoConfig.from_pretrained(REPO / "toy" / "student_config.json", **changes).save_pretrained(model_dir)
    return model_dir


@pytest.fixture
def fake_llm(monkeypatch):
    """vllm.LLM replaced by a recorder of its arguments; VLLM_CPU_KVCACHE_SPACE restored after the test."""
    vllm = pytest.importorskip("vllm")
    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    return seen


def test_vllm_engine_gets_the_kv_cache_budget_and_the_runs_context(fake_llm, tmp_path):
    model_dir = saved_toy_config(tmp_path, max_position_embeddings=40_960)
    engines.make_vllm_engine(str(model_dir), 832, kv_cache_gb=3.0)
    assert fake_llm["kv_cache_memory_bytes"] == 3 * 2**30
    assert fake_llm["max_model_len"] == 832        # the run's prompt + response, not the model's 40,960


def test_the_kv_flag_wins_over_an_inherited_environment_variable(fake_llm, tmp_path, monkeypatch, caplog):
    import os
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "9")   # vLLM's CPU backend would let it override the flag
    with caplog.at_level("WARNING", logger="rollout"):
        engines.make_vllm_engine(str(saved_toy_config(tmp_path)), 832, kv_cache_gb=1.5)
    assert fake_llm["kv_cache_memory_bytes"] == int(1.5 * 2**30)
    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    assert "VLLM_CPU_KVCACHE_SPACE=9" in caplog.text and "--vllm_kv_cache_gb 1.5" in caplog.text


def test_a_sequence_that_cannot_fit_the_kv_budget_stops_before_vllm_starts(fake_llm, tmp_path):
    # 2 layers x 1 KV head x 32 x 2 x 4 bytes = 512 bytes a token: 64k tokens need 32 MiB
    model_dir = saved_toy_config(tmp_path, max_position_embeddings=1 << 20)
    with pytest.raises(SystemExit) as stop:
        engines.make_vllm_engine(str(model_dir), 65_536, kv_cache_gb=0.01)
    message = str(stop.value)
    assert "--vllm_kv_cache_gb 0.01" in message and "65536" in message and "0.03 GiB" in message
    assert not fake_llm                                               # vLLM was never asked
    engines.make_vllm_engine(str(model_dir), 16_384, kv_cache_gb=0.01)   # 8 MiB: fits
    assert fake_llm["max_model_len"] == 16_384
