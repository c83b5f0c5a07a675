"""
sft.py: stage 1, cold-start supervised fine-tuning on multi-turn tool-use trajectories.

The model reads whole conversations (system block declaring the tool, user question, assistant turns
that call the code interpreter, tool responses, final answer) and is trained with next-token
cross-entropy on the tokens the assistant wrote, and on nothing else:

    loss = sum_t m_t * CE(x_t) / sum_t m_t         (token mean over the whole optimizer batch)

where m_t = 1 iff token x_t belongs to an assistant turn: its content, its rendered <tool_call> JSON
and its closing <|im_end|>. System/tool-declaration tokens, user turns, tool responses and the
`<|im_start|>assistant\\n` headers get m_t = 0. Gradient accumulation divides by the token count of
the whole batch, so micro-batching does not change the loss.

Memory is bounded by a token budget, not by luck. Each micro-batch runs as forward passes of at most
--max_forward_tokens padded tokens (rows x padded length), each pass's loss divided by the token count of the
batch (or, with --loss_agg micro, of its whole micro-batch), so the cut changes neither the loss nor the
gradient. The log-probs come from rollout.token_logprobs, as in RL: the vocabulary projection runs in
checkpointed chunks, never [B, T, V] logits. The default budget, 2^25 / (layers x hidden size) tokens, is about
5 GB of float32 activations: 1941 tokens for SmolLM2-135M (3 rows of 512), 65536 or more for the toy models,
whose micro-batches of up to 32 rows of 512 it never cuts.

Train as you roll out. A conversation is rendered with the real Qwen3 chat template and cut at
the assistant spans; each piece is tokenized on its own, exactly as rollout.py builds a rollout
(prompt encoded once, model tokens appended, tool responses encoded as a segment), so the ids equal
a rollout of the same turns (tests check it, with the real Qwen3 vocabulary too). They equal the
template's whole-text tokenization as well, except where BPE would merge across a cut: an assistant
turn that begins with "\\n" gets "\\n", "\\n" after its header, not the template's single "\\n\\n" token,
because in a rollout the header's newline is already in the context when the model writes its own.
A row whose text holds a chat control token (<|im_start|>, <|im_end|>, <|endoftext|>) anywhere,
in a tool output, a user turn or the assistant's own text, is refused and counted: the tokenizer
reads such text as the control token itself, which would move a mask boundary.

Think blocks. We render the conversation once, as the Qwen3 template
renders the whole of it: reasoning written inside <think>...</think> is kept on the turns after the
last user message, and the template's empty "<think>\\n\\n</think>\\n\\n" appears on the final
assistant turn only (the turn that answers), not on the tool-calling turns. A model trained this way
opens its answering turn with an empty think block and its tool-calling turns without one. The
reference renders turn by turn instead, so every assistant turn there is "last" and gets an empty
think block.

Deviations from the reference trainer, on purpose:
  - the loss of predicting token t uses the mask of token t (the label); the reference uses the mask
    of token t-1, so it skips the first token of every assistant turn and trains the token after its
    closing newline (verl/trainer/fsdp_sft_trainer.py);
  - the "\\n" after an assistant's <|im_end|> is not trained (m = 0): a rollout never generates it
    (generation stops at <|im_end|>; with the default --tool_junction template, rollout.py appends it as part
    of the tool segment). The reference trains it (multiturn_sft_dataset.py renders each assistant message
    with the template, newline included, under mask 1), and its rollouts leave it out (docs/deviations.md
    rows 15, 16);
  - loss is a token mean over the whole optimizer batch, not a mean of per-micro-batch token means
    (--loss_agg micro: the reference's);
  - warmup multiplies the peak lr by (step + 1) / W, where the reference's scheduler uses step / W and runs
    its first optimizer step at lr 0 (--warmup_from_zero: the reference's).

Reference values (real models): lr 1e-5, AdamW (0.9, 0.95), weight decay 0.01, grad clip 1.0,
cosine with 10% warmup to 0, 5 epochs, batch 128, max length 32768, bf16 autocast (always on a GPU).

    python sft.py                                  # toy student, CPU, ~1.5 min
    python sft.py --toy_gap_share 0.3 --toy_gap_known 0.01 --epochs 6   # pipeline.py's student
    python sft.py --model toy-teacher --out_dir runs/sft-teacher --toy_recovery_frac 0 \\
        --toy_direct_frac 0.5 --epochs 6           # ~4 min
    python sft.py --model Qwen/Qwen3-0.6B --data full_sft_3k_shuffled_v4.parquet --out_dir runs/sft-0.6b \\
        --epochs 5 --batch_size 128 --micro_batch_size 16 --lr 1e-5 --max_length 32768 \\
        --grad_checkpointing true
"""
import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import rollout
import tools
from common import chat_template, dist, models, runs
from common.cli import arg, reject_unused, run_script
from common.data import check_conversation, load_rows
from toy import task

log = logging.getLogger("sft")


@dataclass
class Config:
    """Cold-start multi-turn SFT with an assistant-only loss."""
    # data
    model: str = arg("toy-student", "local path, Hugging Face name, or toy-student / toy-teacher")
    data: str = arg("toy", "'toy' (generated) or a .jsonl/.parquet file with `messages` and `tools`")
    chat_template: str = arg("", "chat template: empty (the model's own), qwen3 (Qwen3's, tool-aware) or a "
                                 ".jinja file; saved with the checkpoints")
    toy_examples: int = arg(5000, "number of generated toy conversations")
    toy_recovery_frac: float = arg(0.25, "fraction of toy conversations where one tool call fails "
                                         "and is redone")
    toy_retry_frac: float = arg(0.0, "fraction of toy conversations where one call meets a transient failure "
                                     "and is sent again")
    toy_direct_frac: float = arg(0.0, "fraction of toy conversations that answer at once, without the tool")
    toy_steps: str = arg("2-4", "toy problems need this many dependent tool calls (from 1 to 8)")
    toy_gap_share: float = arg(1.0, "how often a toy problem is in the gap notation (`x / y`, computed as "
                                    "`x // y`), relative to the held-out splits' half (1: the teacher's; 0.3: "
                                    "pipeline.py's student)")
    toy_gap_known: float = arg(1.0, "share of those problems that the data solves with `//`; the others read "
                                    "`/` as Python does, to a wrong answer (1: the teacher's; 0.01: "
                                    "pipeline.py's student)")
    max_length: int = arg(512, "tokens per example; longer ones are cut on the right (reference 32768)")
    strict_data: bool = arg(False, "stop at the first malformed row instead of skipping it")
    # optimization
    epochs: int = arg(4, "passes over the data (reference 5)")
    max_steps: int = arg(-1, "stop after this many optimizer steps (-1: epochs decide)")
    batch_size: int = arg(32, "sequences per optimizer step (reference 128)")
    micro_batch_size: int = arg(32, "sequences per micro-batch, the group that --loss_agg micro takes a token "
                                    "mean over (gradient accumulation fills the batch)")
    max_forward_tokens: int = arg(0, "token budget of one forward pass: a micro-batch runs as forward passes of "
                                     "at most this many padded tokens (rows x padded length), with the same "
                                     "loss and gradient; a row longer than the budget runs alone. 0: 2^25 / "
                                     "(layers x hidden size), about 5 GB of activations (1941 tokens for "
                                     "SmolLM2-135M; 65536 or more for the toy models, whose micro-batches are "
                                     "never cut)")
    sort_by_length: bool = arg(False, "sort each optimizer batch by length before cutting it into "
                                      "micro-batches: less padding, the same examples and the same loss "
                                      "(--loss_agg batch only); needs micro_batch_size < batch_size")
    lr: float = arg(3e-3, "peak learning rate (reference 1e-5)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "max gradient norm")
    warmup_frac: float = arg(0.1, "linear warmup, fraction of all steps; cosine decay to 0 after")
    warmup_from_zero: bool = arg(False, "warmup multiplier step / W (the first step at lr 0), as the reference's "
                                        "scheduler; default (step + 1) / W")
    loss_agg: str = arg("batch", "batch: one token mean over the whole optimizer batch | micro: the mean of "
                                 "per-micro-batch token means, as the reference's SFT trainer")
    grad_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    # run
    out_dir: str = arg("runs/sft-student", "checkpoints, metrics.jsonl and final/ go here")
    save_every: int = arg(100, "checkpoint every N steps (atomic, keeps the latest)")
    resume: bool = arg(False, "continue from the newest complete checkpoint in out_dir")
    eval_prompts: int = arg(64, "toy validation problems for two checks at the end: greedy accuracy, and the "
                                "tool calls written right teacher-forced (call_accuracy) (0: skip; --data toy "
                                "only)")
    seed: int = arg(0, "random seed (data order, init of toy models)")
    device: str = arg("", "cpu or cuda (empty: cuda if available)")


# -----------------------------------------------------------------------------
# Tokenization with the assistant-only mask

def tokenize_conversation(tokenizer, messages: list[dict], tools_schema: list[dict] | None = None,
                          marks: chat_template.Markers | None = None) -> tuple[list[int], list[int]]:
    """Conversation -> (input_ids, loss_mask). loss_mask[t] = 1 exactly for tokens the assistant wrote."""
    text = tokenizer.apply_chat_template(messages, tools=tools_schema or None, tokenize=False)
    return tokenize_rendered(tokenizer, text, marks or chat_template.markers(tokenizer, "the tokenizer"))


def tokenize_rendered(tokenizer, text: str, marks: chat_template.Markers) -> tuple[list[int], list[int]]:
    """A rendered conversation -> (input_ids, loss_mask), cut at the template's assistant markers."""
    # Cut the text at the assistant spans: [header][content ... end] -> mask 0, mask 1
    # (Qwen3: header "<|im_start|>assistant\n", end "<|im_end|>").
    pieces, pos = [], 0
    while (start := text.find(marks.header, pos)) != -1:
        start += len(marks.header)
        end = text.find(marks.end, start)
        end = len(text) if end == -1 else end + len(marks.end)
        pieces += [(text[pos:start], 0), (text[start:end], 1)]
        pos = end
    pieces.append((text[pos:], 0))
    input_ids, loss_mask = [], []
    for piece, m in pieces:
        ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
        input_ids += ids
        loss_mask += [m] * len(ids)
    return input_ids, loss_mask


def load_sft_examples(cfg: Config, tokenizer) -> list[tuple[list[int], list[int]]]:
    """All rows tokenized; malformed rows are reported with file and row number, then skipped (or fatal)."""
    if cfg.data == "toy":
        rows, name = task.sft_rows(cfg.toy_examples, cfg.toy_recovery_frac, cfg.seed, cfg.toy_retry_frac,
                                   cfg.toy_direct_frac, task.steps_range(cfg.toy_steps), cfg.toy_gap_share,
                                   cfg.toy_gap_known), "toy"
    else:
        rows, name = load_rows(cfg.data), cfg.data
    marks, control = chat_template.markers(tokenizer, cfg.model), chat_template.control_tokens(tokenizer)
    examples, problems, declared = [], [], False
    for i, row in enumerate(rows):
        problem = check_conversation(row, control)
        if problem is None:
            messages = [dict(m, content=m.get("content") or "") for m in row["messages"]]
            if row.get("tools") and not declared:  # once per run: the template shows the model its tool
                chat_template.check_declares_tool(tokenizer, row["tools"][0], cfg.model)
                declared = True
            try:
                text = tokenizer.apply_chat_template(messages, tools=row.get("tools") or None, tokenize=False)
            except Exception as e:  # a template error names the row instead of surfacing from jinja
                problem = f"chat template failed: {e}"
            else:
                lost = chat_template.lost_in_rendering(text, messages)
                if lost:  # the template drops tool calls or responses: every row would train without them
                    raise SystemExit(f"{cfg.model}: its chat template dropped {lost} of {name} row {i}, so "
                                     f"SFT would train on conversations without their tool use. "
                                     f"{chat_template.FIX}")
                ids, mask = tokenize_rendered(tokenizer, text, marks)
                if sum(mask) == 0:
                    problem = "empty loss mask"
                elif sum(mask[:cfg.max_length]) == 0:
                    problem = (f"all assistant tokens lie beyond max_length={cfg.max_length} "
                               f"({len(ids)} tokens)")
                else:
                    examples.append((ids[:cfg.max_length], mask[:cfg.max_length]))
        if problem:
            problems.append(f"{name} row {i}: {problem}")
            if cfg.strict_data:
                raise SystemExit(problems[-1])
    for p in problems[:5]:
        log.warning(p)
    if problems:
        log.warning("skipped %d of %d rows", len(problems), len(rows))
    if not examples:
        raise SystemExit(f"{name}: no usable SFT rows")
    return examples


def micro_batch_loss(logprobs, label_mask, loss_agg: str, batch_tokens: int, parts: int,
                     micro_tokens: int | None = None):
    """The share of the optimizer batch's loss of some rows of a micro-batch (all of them, or those of one
    forward pass); the shares of all forward passes of all micro-batches of all ranks add up to the loss.
    logprobs, label_mask: [b, T-1].
      batch: their summed NLL over the label tokens of the whole batch (one token mean over the batch);
      micro: their summed NLL over the label tokens of their whole micro-batch (`micro_tokens`; default: those
             of label_mask, the micro-batch in one forward pass), divided by `parts`, the number of
             micro-batches on all ranks (the reference's fsdp_sft_trainer: a token mean per micro-batch and
             rank, divided by the micro-batch count, the gradients averaged over ranks)."""
    nll = -(logprobs * label_mask).sum()
    if loss_agg == "micro":
        # NOTE: a micro-batch cut into several forward passes divides each by the token count of the whole
        # micro-batch, not of its own rows: the parts add up to the micro-batch's token mean
        tokens = label_mask.sum().clamp(min=1) if micro_tokens is None else max(1, micro_tokens)
        return nll / tokens / parts
    return nll / batch_tokens


# A forward pass under autograd keeps about 150 bytes per token, layer and hidden unit for its backward pass
# (measured on CPU in float32: SmolLM2-135M, 30 layers of 576, holds 2.5 MB a token at 512 tokens a row).
# 2^25 units is about 5 GB whatever the model's size.
FORWARD_UNITS = 2**25


def forward_token_budget(config) -> int:
    """The default --max_forward_tokens: padded tokens per forward pass that hold about 5 GB of activations."""
    return max(1, FORWARD_UNITS // (config.num_hidden_layers * config.hidden_size))


def collate(batch, pad_id, device):
    """[B, T] ids and attention mask, and the loss mask in label space [B, T-1].
    NOTE: the logit at position t predicts token t+1, so it is weighted by the mask of token t+1
    (the reference uses the mask of token t here: off by one)."""
    return rollout.pad_batch([ids for ids, _ in batch], [mask for _, mask in batch], pad_id, device)


# -----------------------------------------------------------------------------
# A held-out check: does the model write the data's tool calls?

def call_accuracy(model, tokenizer, conversations: list[list[dict]], tools_schema: list[dict] | None = None,
                  batch_size: int = 32, chunk_tokens: int = 1024) -> float:
    """Teacher-forced accuracy of the tool calls in solved held-out conversations: the fraction of assistant
    turns that call the tool in which the model's most likely next token is the conversation's own at every
    position. The first token of the first assistant turn is left out: there the model chooses between
    calling the tool and answering at once, which a model trained on both kinds of data may leave open.

    What it measures is what a teacher's GRPO cannot mend: a call copied wrong from the problem (the toy
    teacher that confuses two operators writes the right call on about half of its tries whatever it is
    rewarded, docs/results.md), where greedy or sampled accuracy also mixes in the call-or-answer choice."""
    marks = chat_template.markers(tokenizer, "the tokenizer")
    device = next(model.parameters()).device
    lm_head = model.get_output_embeddings()
    right = calls = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(conversations), batch_size):
        part = conversations[start:start + batch_size]
        examples = [tokenize_conversation(tokenizer, messages, tools_schema, marks) for messages in part]
        input_ids, attention_mask, label_mask = collate(examples, tokenizer.pad_token_id, device)
        with torch.inference_mode():
            hidden = rollout.final_hidden_states(model, input_ids, attention_mask)[:, :-1]   # [b, T-1, H]
            # the most likely token after each position, a chunk of positions at a time (no [b, T, V] logits)
            flat = hidden.reshape(-1, hidden.shape[-1])
            best = torch.cat([lm_head(flat[s:s + chunk_tokens]).argmax(-1)
                              for s in range(0, flat.shape[0], chunk_tokens)]).view(hidden.shape[:2])
        hit = (best == input_ids[:, 1:]) | (label_mask == 0)                                 # [b, T-1]
        for row, messages in enumerate(part):
            # the assistant spans, in order: span j is the j-th assistant message (tokenize_rendered's cuts)
            spans = [[t for t, _ in run] for on, run in
                     itertools.groupby(enumerate(label_mask[row].tolist()), key=lambda x: x[1]) if on]
            turns = [m for m in messages if m["role"] == "assistant"]
            for j, (span, turn) in enumerate(zip(spans, turns)):
                if turn.get("tool_calls"):
                    calls += 1
                    right += bool(hit[row, span[0] + (j == 0):span[-1] + 1].all())
    model.train(was_training)
    if calls == 0:
        raise ValueError("call_accuracy: the conversations hold no tool call")
    return right / calls


# -----------------------------------------------------------------------------

def cosine_lr(step: int, total: int, warmup: int, from_zero: bool = False) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine down to 0. The warmup reaches 1 at step W - 1;
    from_zero gives the reference's step / W (verl/utils/torch_functional.py:
    get_cosine_schedule_with_warmup), 0 at the first step and 1 at step W."""
    if step < warmup:
        return (step if from_zero else step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------

def main(cfg: Config):
    # the inputs first: nothing is written before the model and the data are known to be usable
    if cfg.data != "toy":
        reject_unused(cfg, ["toy_examples", "toy_recovery_frac", "toy_retry_frac", "toy_direct_frac",
                                    "toy_steps", "toy_gap_share", "toy_gap_known"],
                              "with --data other than toy")
        if cfg.eval_prompts not in (0, Config.eval_prompts):
            raise SystemExit("--eval_prompts is not used with --data other than toy "
                             "(the held-out check is the toy's)")
    for name in ("toy_gap_share", "toy_gap_known"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise SystemExit(f"--{name} must be from 0 to 1, not {getattr(cfg, name)}")
    if cfg.loss_agg not in ("batch", "micro"):
        raise SystemExit(f"--loss_agg must be batch or micro, not {cfg.loss_agg!r}")
    if cfg.max_forward_tokens < 0:
        raise SystemExit(f"--max_forward_tokens must be 0 (from the model's size) or more, "
                         f"not {cfg.max_forward_tokens}")
    if cfg.sort_by_length and cfg.loss_agg != "batch":  # micro: which rows share a micro-batch changes the loss
        raise SystemExit("--sort_by_length keeps the loss only with --loss_agg batch (with micro, the token "
                         "mean of each micro-batch depends on which rows it holds)")
    d, device = dist.init_processes(cfg.device)  # torchrun: one process per GPU (or CPU rank)
    share = -(-cfg.batch_size // d.world)  # rows of a batch on each rank
    if cfg.sort_by_length and dist.n_micro_batches(share, cfg.micro_batch_size) == 1:
        raise SystemExit(f"--sort_by_length changes nothing when a rank's {share} rows of a batch fit one "
                         f"micro-batch: set --micro_batch_size below {share}")
    tokenizer = models.load_tokenizer(cfg.model, cfg.chat_template)
    examples = load_sft_examples(cfg, tokenizer)
    steps_per_epoch = max(1, len(examples) // cfg.batch_size)  # drop_last, as the reference
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else cfg.max_steps
    n_tokens = sum(sum(m) for _, m in examples)
    log.info("%d examples, %d trained tokens, %d steps", len(examples), n_tokens, total_steps)

    model = models.load_model(cfg.model, device=device, dtype=torch.float32, seed=cfg.seed)  # fp32 master
    forward_tokens = cfg.max_forward_tokens or forward_token_budget(model.config)
    log.info("at most %d padded tokens per forward pass", forward_tokens)
    run = runs.start_run(cfg, model, d, device, grad_checkpointing=cfg.grad_checkpointing,
                         make_optimizer=lambda params: torch.optim.AdamW(
                             params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay))
    model, optimizer = run.model, run.optimizer
    warmup = int(cfg.warmup_frac * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, total_steps, warmup, cfg.warmup_from_zero))
    if run.state is not None:
        scheduler.load_state_dict(run.state["scheduler"])

    with run:
        for step in run.steps(total_steps, "sft"):
            # Data order is a pure function of (seed, epoch): a resumed run sees the same batches.
            epoch, k = divmod(step, steps_per_epoch)
            order = np.random.RandomState(cfg.seed + epoch).permutation(len(examples))
            batch = [examples[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
            batch_tokens = sum(sum(m[1:]) for _, m in batch)  # label tokens with loss in the whole batch
            mine = batch[d.rank::d.world]                     # this rank's rows (all of them in one process)
            if cfg.sort_by_length:  # rows of like length share a micro-batch: less padding, same batch loss
                mine = sorted(mine, key=lambda example: len(example[0]))
            t0 = time.time()
            loss_sum = 0.0
            largest_share = -(-len(batch) // d.world)
            n_micro = dist.n_micro_batches(largest_share, cfg.micro_batch_size)
            # Memory is bounded by the token budget: each micro-batch runs as forward passes of `per_forward`
            # rows, and rows x padded length <= rows x the batch's longest row <= the budget. The longest row
            # of the whole batch, not of this rank's rows, so that every rank runs the same number of forward
            # passes (under FSDP each is a collective). The toy's micro-batches are never cut.
            per_forward = max(1, forward_tokens // max(len(ids) for ids, _ in batch))
            n_forward = dist.n_micro_batches(min(largest_share, cfg.micro_batch_size), per_forward)
            for rows in dist.micro_batches(list(range(len(mine))), cfg.micro_batch_size, n_micro):
                micro = [mine[i] for i in rows]
                micro_tokens = sum(sum(m[1:]) for _, m in micro)  # label tokens of the micro-batch
                for chunk in dist.micro_batches(micro, per_forward, n_forward):
                    part = chunk or [(batch[0][0][:2], [0, 0])]   # an empty turn still runs a forward
                    input_ids, attention_mask, label_mask = collate(part, tokenizer.pad_token_id, device)
                    # [b, T-1], bf16 autocast on GPU
                    logprobs = rollout.token_logprobs(model, input_ids, attention_mask)
                    loss = micro_batch_loss(logprobs, label_mask, cfg.loss_agg, batch_tokens, n_micro * d.world,
                                            micro_tokens)
                    # FSDP averages gradients over ranks: x world makes the average a sum
                    (loss * d.world).backward()
                    loss_sum += loss.item()
            grad_norm = runs.optimizer_step(optimizer, model, cfg.grad_clip, run.health)
            scheduler.step()
            stats = dist.all_sum({"loss": loss_sum}, d)
            run.log({"step": step + 1, "loss": stats["loss"], "lr": scheduler.get_last_lr()[0],
                     "grad_norm": grad_norm,
                     "tokens_per_s": sum(len(ids) for ids, _ in batch) / (time.time() - t0),
                     "skipped_steps": run.health["skipped"]})
            run.bar.set_postfix(loss=f"{stats['loss']:.3f}")
            run.save_if_due(step + 1, total_steps, tokenizer, scheduler=scheduler.state_dict())
    run.finish(tokenizer)
    if cfg.data == "toy" and cfg.eval_prompts > 0 and d.main:
        import evaluate
        plain = model.eval() if d.world == 1 else models.load_model(str(run.out_dir / "final"), device=device)
        result = evaluate.greedy_accuracy(plain, tokenizer, "toy:valid", cfg.eval_prompts, cfg.toy_steps)
        log.info("greedy accuracy on %d toy validation problems: %.3f", cfg.eval_prompts, result)
        print(f"greedy accuracy on the validation split: {result:.3f}")
        held_out = task.held_out_conversations(cfg.eval_prompts, task.steps_range(cfg.toy_steps))
        calls = call_accuracy(plain, tokenizer, held_out, [tools.TOOL_SCHEMA])
        print(f"tool calls right, teacher-forced, on the validation split: {calls:.3f}")
    dist.barrier(d)
    return model


if __name__ == "__main__":
    run_script(main, Config)
