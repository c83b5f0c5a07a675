"""
Builds the toy tokenizer committed in toy/tokenizer/ (run once; the output is checked in).

A byte-level BPE trained on rendered toy conversations, with:
  - Qwen3's special tokens as single tokens: <|endoftext|>, <|im_start|>, <|im_end|> (special: dropped by
    skip_special_tokens) and <tool_call>, </tool_call>, <tool_response>, </tool_response>, <think>, </think>
    (added but not special, as in Qwen3, so they stay in decoded text and the graders see them);
  - every digit its own token, and every newline its own pre-token, so that tokenizing a whole
    conversation gives the same ids as tokenizing its turns one by one (what rollout.py does);
  - no split at spaces, so the long fixed tool-declaration block compresses into few tokens and the
    CPU runs stay short (a real Qwen3 tokenizer splits words; nothing else here depends on that);
  - the real Qwen3 chat template, so prompts, tool calls and tool responses have a real model's bytes.

    python toy/build_tokenizer.py
"""
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from toy import task  # noqa: E402

VOCAB_SIZE = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def corpus(chat_template: str) -> list[str]:
    """Rendered toy conversations (half of them with a tool error) plus a few generic Python error lines."""
    render = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), chat_template=chat_template)
    texts = [render.apply_chat_template(r["messages"], tools=r["tools"], tokenize=False)
             for r in task.sft_rows(3000, recovery_frac=0.5, seed=123)]
    texts += ["SyntaxError: invalid syntax\nZeroDivisionError: integer division or modulo by zero\n"
              "Error when executing tool: no stdout here\n...(truncated)...\n"
              "IndentationError: unexpected indent\n"] * 50
    return texts


def main():
    chat_template = (HERE / "tokenizer" / "chat_template.jinja").read_text()  # the real Qwen3 template
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(ADDED), special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(chat_template), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 chat_template=chat_template, model_max_length=4096)
    hf.add_tokens(ADDED)
    out = HERE / "tokenizer"
    hf.save_pretrained(str(out))
    print(f"saved {len(hf)} tokens to {out}")
    sample = task.sft_rows(1, recovery_frac=1.0, seed=7)[0]
    text = hf.apply_chat_template(sample["messages"], tools=sample["tools"], tokenize=False)
    ids = hf.encode(text, add_special_tokens=False)
    assert hf.decode(ids) == text, "round trip failed"
    print(f"a recovery conversation: {len(text)} chars -> {len(ids)} tokens")


if __name__ == "__main__":
    random.seed(0)
    main()
