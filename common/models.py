"""
common/models.py: tokenizers and causal LMs from a local folder, the local Hugging Face cache, or the tiny
built-in toy configs ("toy-student", "toy-teacher", "toy-teacher-small", "toy-teacher-large"), with the checks
that stop a run before anything is written: a model path that does not exist, weights that are not finite, a
teacher and a student that do not share one tokenizer. Nothing is downloaded at run time.
"""
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent.parent
TOY_DIR = REPO_DIR / "toy"
TOY_MODELS = {"toy-student": TOY_DIR / "student_config.json", "toy-teacher": TOY_DIR / "teacher_config.json",
              # the default teacher until it was found to copy imprecisely on some seeds and CPU kernels
              # (docs/results.md, "CPU kernels, and a teacher that does not always hold")
              "toy-teacher-small": TOY_DIR / "teacher_small_config.json",
              "toy-teacher-large": TOY_DIR / "teacher_large_config.json"}


# the toy checkpoints the stages look for by default, and the command that makes each
DEFAULT_CHECKPOINTS = {
    "runs/sft-student/final": "python sft.py",
    "runs/sft-teacher/final": "python sft.py --model toy-teacher --out_dir runs/sft-teacher "
                              "--toy_recovery_frac 0 --toy_direct_frac 0.5 --epochs 6",
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


def load_tokenizer(name_or_path: str, chat_template: str = ""):
    """The tokenizer of a checkpoint, with `stop_token_ids`: every end-of-sequence id of the model (Qwen3's
    generation config lists <|im_end|> and <|endoftext|>), where generation stops. `chat_template` (a file,
    or a name of common.chat_template.TEMPLATES) replaces the model's template, and the token that ends an
    assistant turn in it becomes a stop id too."""
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
    if chat_template:
        from common import chat_template as templates
        templates.apply(tokenizer, chat_template, name_or_path)
        end = tokenizer.convert_tokens_to_ids(templates.markers(tokenizer, name_or_path).end)
        stop += [end] if end not in stop else []
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

