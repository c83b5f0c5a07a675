"""sft.py: the assistant-only mask, train-as-you-roll-out ids, schedule and loss, bad data, exact resume."""
import json
import math
from dataclasses import replace

import pytest
import torch
from test_rollout import conversation

import rollout
import sft
import tools
from common import chat_template, data, models, runs
from toy import task


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("toy-student")


def assistant_spans(text):
    """Every assistant message's text as the template renders it: after the header, through <|im_end|>."""
    spans = []
    for part in text.split("<|im_start|>assistant\n")[1:]:
        spans.append(part.split("<|im_end|>")[0] + "<|im_end|>")
    return spans


def masked_runs(tok, ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_loss_mask_is_exactly_the_assistant_spans_of_the_chat_template(tok):
    msgs = conversation()
    ids, mask = sft.tokenize_conversation(tok, msgs, [tools.TOOL_SCHEMA])
    text = tok.apply_chat_template(msgs, tools=[tools.TOOL_SCHEMA], tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)           # the template's own tokenization
    assert masked_runs(tok, ids, mask) == assistant_spans(text)         # and exactly its assistant spans
    assert len(assistant_spans(text)) == 3
    # nothing else is trained: the system block, the user turn, tool responses, headers, the final newline
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "You are a careful solver." in unmasked and "<tool_response>\n36\n" in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 3


def test_think_block_follows_the_template_on_the_final_turn_only(tok):
    ids, mask = sft.tokenize_conversation(tok, conversation(), [tools.TOOL_SCHEMA])
    runs = masked_runs(tok, ids, mask)
    assert runs[-1].startswith("<think>\n\n</think>\n\nThe answer is") and "<think>" not in runs[0]


def test_sft_ids_equal_a_rollout_of_the_same_turns(tok):
    """Train as you roll out: replay the assistant turns through the tool loop and compare ids."""
    row = task.sft_rows(1, recovery_frac=1.0, seed=3)[0]
    ids, mask = sft.tokenize_conversation(tok, row["messages"], row["tools"])
    turns = [tok.encode(s, add_special_tokens=False) for s in assistant_spans(tok.decode(ids))]

    def replay(contexts, budgets, sampling, seeds):
        k = tok.decode(contexts[0]).count("<|im_start|>assistant\n") - 1
        return [turns[k]]

    prompt = row["messages"][0]["content"]
    (t,) = rollout.rollout(replay, tok, [data.Prompt(prompt, "toy_arith", "0")],
                           1, rollout.RolloutConfig(max_response_tokens=10_000))
    assert t.prompt_ids + t.response_ids == ids[:-1]   # SFT keeps the template's final "\n"
    assert [0] * len(t.prompt_ids) + t.response_mask == mask[:-1]
    assert "Traceback" in t.text                       # the replayed tool error came from the real sandbox


def test_loss_uses_the_label_mask_not_the_previous_token():
    ids, mask = [10, 11, 12, 13, 14], [0, 0, 1, 1, 0]
    _, _, label_mask = sft.collate([(ids, mask)], 0, "cpu")
    # position t predicts token t+1: the first assistant token (index 2) is trained, the one after (4) is not
    assert label_mask.tolist() == [[0, 1, 1, 0]]


def reference_cosine(step, total, warmup, min_lr_ratio=0.0, num_cycles=0.5):
    """verl/utils/torch_functional.py: get_cosine_schedule_with_warmup's multiplier, re-typed."""
    if step < warmup:
        return min_lr_ratio + (1.0 - min_lr_ratio) * (float(step) / float(max(1, warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    x = math.cos(math.pi * float(num_cycles) * 2.0 * progress)
    return max(min_lr_ratio, x * (1 - min_lr_ratio) * 0.5 + (1 + min_lr_ratio) * 0.5)


def test_warmup_from_zero_is_the_reference_schedule_and_the_default_starts_one_step_ahead():
    assert [sft.cosine_lr(s, 100, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [sft.cosine_lr(s, 100, 4, from_zero=True) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for total, warmup in ((100, 10), (23, 2), (7, 0)):
        ours = [sft.cosine_lr(s, total, warmup, from_zero=True) for s in range(total)]
        assert ours == pytest.approx([reference_cosine(s, total, warmup) for s in range(total)], abs=1e-12)
        assert ([sft.cosine_lr(s, total, warmup) for s in range(warmup, total)]
                == pytest.approx(ours[warmup:], abs=1e-12))  # the same decay after the warmup


def test_loss_agg_micro_is_the_mean_of_micro_batch_token_means():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
                        dtype=torch.float64)
    parts = [[0], [1, 2, 3]]                # two micro-batches of unequal sizes
    def total(agg):
        return sum(sft.micro_batch_loss(logprobs[p], mask[p], agg, int(mask.sum()), len(parts)) for p in parts)
    token_mean = -(logprobs * mask).sum() / mask.sum()
    means = [-(logprobs[p] * mask[p]).sum() / mask[p].sum() for p in parts]
    assert torch.isclose(total("batch"), token_mean) and torch.isclose(total("micro"), sum(means) / 2)
    assert not torch.isclose(total("micro"), token_mean)


def test_the_reference_schedule_and_loss_run_end_to_end(tmp_path):
    cfg = sft.Config(max_steps=4, warmup_frac=0.5, toy_examples=48, batch_size=16, micro_batch_size=8,
                     eval_prompts=0, warmup_from_zero=True, loss_agg="micro", out_dir=str(tmp_path / "run"))
    sft.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the lr logged after step k is the next step's: step / W from the first step (lr 0), W = 2
    assert [r["lr"] for r in rows[:2]] == pytest.approx([0.5 * cfg.lr, cfg.lr])
    with pytest.raises(SystemExit, match="--loss_agg must be batch or micro"):
        sft.main(replace(cfg, loss_agg="sum"))


def test_sorting_a_batch_by_length_keeps_its_loss_and_gradient(tmp_path):
    # the same 16 examples in micro-batches of 8, cut as they come or after sorting by length: the step's loss
    # and gradient norm agree to float rounding (a row lost or counted twice would move both)
    cfg = sft.Config(max_steps=1, toy_examples=48, batch_size=16, micro_batch_size=8, eval_prompts=0,
                     device="cpu", out_dir=str(tmp_path / "plain"))
    sft.main(cfg)
    sft.main(replace(cfg, sort_by_length=True, out_dir=str(tmp_path / "sorted")))
    plain, ordered = (json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
                      for name in ("plain", "sorted"))
    assert ordered["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert ordered["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    with pytest.raises(SystemExit, match="--loss_agg batch"):
        sft.main(replace(cfg, sort_by_length=True, loss_agg="micro"))
    with pytest.raises(SystemExit, match="changes nothing"):  # one micro-batch: nothing to sort into
        sft.main(replace(cfg, sort_by_length=True, micro_batch_size=16))


@pytest.mark.parametrize("loss_agg", ["batch", "micro"])
def test_a_token_budget_cuts_micro_batches_into_forward_passes_with_the_same_loss_and_gradient(
        tmp_path, monkeypatch, loss_agg):
    # one step of two micro-batches of 8, run whole and then under a budget of 3 rows of the longest: the loss
    # and every gradient agree to float rounding (with micro, each forward pass is divided by the token count
    # of its whole micro-batch; its own rows' count would move both), and no forward pass exceeds the budget
    shapes, grads = [], []
    real_logprobs, real_step = rollout.token_logprobs, runs.optimizer_step

    def counted_logprobs(model, input_ids, attention_mask, **kw):
        shapes.append(tuple(input_ids.shape))                     # (rows, padded length)
        return real_logprobs(model, input_ids, attention_mask, **kw)

    def captured_step(optimizer, model, *args, **kw):
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        return real_step(optimizer, model, *args, **kw)

    monkeypatch.setattr(rollout, "token_logprobs", counted_logprobs)
    monkeypatch.setattr(runs, "optimizer_step", captured_step)
    cfg = sft.Config(max_steps=1, toy_examples=48, batch_size=16, micro_batch_size=8, loss_agg=loss_agg,
                     eval_prompts=0, device="cpu", out_dir=str(tmp_path / "whole"))
    sft.main(cfg)
    assert [rows for rows, _ in shapes] == [8, 8]                  # the default budget cuts no toy micro-batch
    budget = 3 * max(length for _, length in shapes)               # 3 rows of the batch's longest a pass
    shapes.clear()
    sft.main(replace(cfg, max_forward_tokens=budget, out_dir=str(tmp_path / "cut")))
    assert [rows for rows, _ in shapes] == [3, 3, 2, 3, 3, 2]
    assert all(rows * length <= budget for rows, length in shapes)
    whole, cut = (json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
                  for name in ("whole", "cut"))
    assert cut["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item()), name
    with pytest.raises(SystemExit, match="--max_forward_tokens must be"):
        sft.main(replace(cfg, max_forward_tokens=-1))


def test_the_default_token_budget_never_cuts_a_toy_micro_batch():
    # micro-batches of up to 32 rows of max_length 512, as sft.py's and pipeline.py's toy runs have: one forward
    # pass each, so the toy's numbers do not move by a bit
    from transformers import AutoConfig
    for name, path in models.TOY_MODELS.items():
        assert sft.forward_token_budget(AutoConfig.from_pretrained(str(path))) >= 32 * 512, name


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
                   {"role": "assistant", "content": "y"}]}, "no preceding assistant tool call"),
    ({"messages": []}, "empty"),
    ({"text": "hello"}, "no `messages`"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system message at position 1"),
])
def test_bad_rows_are_named(row, problem):
    assert problem in data.check_conversation(row)


def test_bad_rows_are_reported_with_file_and_row(tmp_path, tok, caplog):
    good = task.sft_rows(1)[0]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r)
                              for r in [good, {"messages": [{"role": "user", "content": "x"}]}, good]))
    cfg = sft.Config(data=str(path), max_length=4096)
    assert len(sft.load_sft_examples(cfg, tok)) == 2
    assert "sft.jsonl row 1: no assistant turn" in caplog.text
    with pytest.raises(SystemExit, match="row 1"):
        sft.load_sft_examples(replace(cfg, strict_data=True), tok)
    with pytest.raises(SystemExit, match="beyond max_length"):
        sft.load_sft_examples(replace(cfg, max_length=20, strict_data=True), tok)


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    base = sft.Config(toy_examples=48, batch_size=8, micro_batch_size=4, max_steps=6, save_every=2,
                      eval_prompts=0, device="cpu")
    straight = sft.main(replace(base, out_dir=str(tmp_path / "a")))

    real_clip, calls = torch.nn.utils.clip_grad_norm_, {"n": 0}

    def crash_on_fifth_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real_clip(*a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        sft.main(replace(base, out_dir=str(tmp_path / "b")))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    assert (tmp_path / "b" / "checkpoint-000004" / "trainer_state.pt").exists()
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoint-000004"
    resumed = sft.main(replace(base, out_dir=str(tmp_path / "b"), resume=True))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the resumed run cut its log back to step 4


def test_sft_parquet_with_openai_tool_calls_loads(tmp_path, tok):
    pd = pytest.importorskip("pandas")
    row = task.sft_rows(1, recovery_frac=0.0)[0]
    for m in row["messages"]:  # OpenAI form: arguments as a JSON string
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    path = tmp_path / "sft.parquet"
    pd.DataFrame([row]).to_parquet(path)
    (example,) = sft.load_sft_examples(sft.Config(data=str(path)), tok)
    ids, mask = example
    assert "print(" in tok.decode([i for i, m in zip(ids, mask) if m])


# -----------------------------------------------------------------------------
# Chat templates: the markers come from the template, and a rendering that loses the tool stops the run

def test_the_assistant_markers_are_read_off_the_template(tok):
    marks = chat_template.markers(tok, "toy")
    assert (marks.header, marks.end, marks.junction) == ("<|im_start|>assistant\n", "<|im_end|>", "\n")


def test_a_template_whose_assistant_turns_cannot_be_located_is_refused(tok):
    plain = models.load_tokenizer("toy-student")
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(SystemExit, match="cannot locate the assistant turns"):
        chat_template.markers(plain, "plain")


def test_a_template_that_drops_tool_calls_stops_sft_before_anything_is_written(tmp_path):
    template = tmp_path / "no_tools.jinja"  # ChatML without tools, tool calls or tool responses
    template.write_text("{% for m in messages %}{% if m['role'] != 'tool' %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = sft.Config(chat_template=str(template), toy_examples=8, out_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="chat template ignores tools="):
        sft.main(cfg)
    row = task.sft_rows(1, 0.0, 0)[0]
    text = chat_template.render(models.load_tokenizer("toy-student", str(template)), row["messages"])
    assert chat_template.lost_in_rendering(text, row["messages"]).startswith("the tool")
    assert chat_template.lost_in_rendering(chat_template.render(models.load_tokenizer("toy-student"),
                                                                row["messages"]), row["messages"]) is None
    assert not (tmp_path / "out").exists()


class NextTokenOracle(torch.nn.Module):
    """A 'model' whose most likely next token is the conversation's own, except where `mistake` changes it:
    its final hidden state at position t is the one-hot of the token it predicts, its output head the
    identity."""
    def __init__(self, vocab_size, mistake=lambda ids: ids):
        super().__init__()
        self.head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
        torch.nn.init.eye_(self.head.weight)
        self.mistake = mistake

    def get_output_embeddings(self):
        return self.head

    def hidden(self, input_ids):
        predicted = self.mistake(torch.roll(input_ids, -1, dims=1))  # position t predicts token t+1
        return torch.nn.functional.one_hot(predicted, self.head.in_features).float()


def test_call_accuracy_counts_the_tool_calls_written_right_and_nothing_else(tok, monkeypatch):
    monkeypatch.setattr(rollout, "final_hidden_states", lambda model, ids, mask: model.hidden(ids))
    conversations = task.held_out_conversations(40)
    calls = [call["function"]["arguments"]["code"] for c in conversations for m in c if m.get("tool_calls")
             for call in m["tool_calls"]]
    plus, minus = (tok.convert_tokens_to_ids(tok.tokenize(op))[0] for op in (" + ", " - "))
    assert tok.tokenize(" + ") == [tok.convert_ids_to_tokens(plus)]  # one token, as in every call

    def accuracy(mistake=lambda ids: ids):
        return sft.call_accuracy(NextTokenOracle(len(tok), mistake), tok, conversations, [tools.TOOL_SCHEMA],
                                 batch_size=16)

    assert accuracy() == 1.0
    # a model that writes " - " for " + ": exactly the calls with a plus are wrong
    assert accuracy(lambda ids: torch.where(ids == plus, minus, ids)) == pytest.approx(
        sum(" + " not in c for c in calls) / len(calls))
    # wrong only where the final answer's digits are (the last assistant turn) or at the first assistant
    # token (call the tool or answer at once): every call is still right
    answer_start = tok.convert_tokens_to_ids(tok.tokenize("<think>"))[0]
    assert accuracy(lambda ids: torch.where(ids == answer_start, plus, ids)) == 1.0
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)

    def first_call_token_wrong(ids):  # the token after the first assistant header of each row (<tool_call>)
        ids = ids.clone()              # becomes something else
        for row in ids:
            # row is already rolled (entry t is token t + 1), so `at` is the position that predicts the turn's
            # first token
            at = next(t for t in range(len(row)) if row[t:t + len(header)].tolist() == header) + len(header)
            assert row[at] == tok.convert_tokens_to_ids("<tool_call>")
            row[at] = plus
        return ids
    assert accuracy(first_call_token_wrong) == 1.0
    with pytest.raises(ValueError, match="no tool call"):
        sft.call_accuracy(NextTokenOracle(len(tok)), tok, [c[:1] + c[-1:] for c in conversations[:2]])
