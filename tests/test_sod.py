"""The step weights and the SOD advantage, against the authors' loop written out from their code."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import authors_code
import grpo
import sft
import sod_distill
from common import data
from rollout import Turn
from sod_distill import distill_advantages, step_divergence, step_index, step_weights


def reference_step_weights(student_lp, teacher_lp, mask, eps=1e-6, delta=0.2):
    """The authors' compute_stepwise_opd_weights (verl/trainer/ppo/ray_trainer.py), operation for operation
    (tests/authors_code.py): steps found token by token with .item() (_extract_step_boundaries), d_k from each
    step's slice, a running product of ratios with the clip applied when writing each step's weight into a
    float32 [B, T] tensor."""
    return authors_code.retyped_step_weights(student_lp, teacher_lp, mask, eps, delta)[0]


def weights(s, t, m, eps=1e-6, delta=0.2):
    """Our chain: the divergences of step_divergence, turned into weights by step_weights."""
    step_id, d = step_divergence(s, t, m)
    return step_weights(d, step_id, eps, delta)


def random_case(B, T, p_switch=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):
        state = int(torch.rand(1, generator=g) < 0.5)
        for t in range(T):
            if torch.rand(1, generator=g) < p_switch:
                state = 1 - state
            mask[b, t] = state
    s = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    t = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return s, t, mask


@pytest.mark.parametrize("seed", range(5))
def test_step_weights_equal_reference_on_random_inputs(seed):
    s, t, m = random_case(6, 60, p_switch=0.25, seed=seed)
    assert torch.allclose(weights(s, t, m), reference_step_weights(s, t, m).double(), atol=1e-6)


def test_step_weights_edge_cases_equal_reference():
    s, t, _ = random_case(5, 12, seed=9)
    mask = torch.tensor([
        [0] * 12,                                  # empty row
        [1] * 12,                                  # one step
        [1, 0] * 6,                                # steps of one token
        [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0],      # holes for tool tokens
        [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1],      # a step running to the end
    ], dtype=torch.float32)
    assert torch.allclose(weights(s, t, mask), reference_step_weights(s, t, mask).double(), atol=1e-6)
    zero = weights(s, s.clone(), mask)  # zero divergence: every ratio is eps/eps
    assert (torch.allclose(zero, reference_step_weights(s, s.clone(), mask).double())
            and torch.equal(zero, mask.double()))


def test_a_batch_without_any_step_gets_zero_weights():
    s, t, _ = random_case(3, 10, seed=4)
    empty = torch.zeros(3, 10)
    assert torch.equal(weights(s, t, empty), torch.zeros(3, 10, dtype=torch.float64))
    assert torch.equal(reference_step_weights(s, t, empty), torch.zeros(3, 10))
    adv, r, w, d, _ = distill_advantages("sod", torch.ones(3), s, t, empty, cfg())
    assert torch.equal(adv, torch.zeros(3, 10, dtype=adv.dtype)) and not w.any()


def test_weights_telescope_to_first_step_ratio():
    # d = 0.1, 0.4, 0.05 on three steps: w = 1, 0.1/0.4, min(0.1/0.05, 1.2)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1]], dtype=torch.float32)
    teacher = torch.zeros(1, 7, dtype=torch.float64)
    student = -torch.tensor([[0.1, 0.1, 0, 0.4, 0, 0.05, 0.05]], dtype=torch.float64)
    w = weights(student, teacher, mask, eps=0.0, delta=0.2)
    assert torch.allclose(w, torch.tensor([[1, 1, 0, 0.25, 0, 1.2, 1.2]], dtype=torch.float64))


def test_step_index_numbers_runs_of_mask_one():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1]])
    assert step_index(mask).tolist() == [[0, 1, 1, 0, 2, 0, 0, 3]]


def test_step_weights_equal_the_authors_loop_on_float32_log_probs_of_long_rows():
    """The whole chain (step_divergence + step_weights) on float32 log-probs, as the trainer produces them, at
    8192 tokens a row. How much faster it is than the authors' loop: python scripts/speed.py."""
    s, t, m = random_case(8, 8192, p_switch=0.01, seed=3)
    s, t = s.float(), t.float()
    assert torch.allclose(weights(s, t, m).float(), reference_step_weights(s, t, m), rtol=1e-5, atol=1e-6)


def cfg(**kw):
    base = dict(coef=1.0, eps=1e-6, delta=0.2, gated_gamma=1.0, gated_beta_min=0.0, gated_beta_max=0.1)
    return SimpleNamespace(**{**base, **kw})


def test_sod_advantage_is_grpo_plus_weighted_teacher_signal():
    s, t, m = random_case(4, 30, seed=1)
    a = torch.randn(4, dtype=torch.float64)
    adv, r, w, _, _ = distill_advantages("sod", a, s, t, m, cfg(coef=0.7))
    expected = a[:, None] * m + 0.7 * weights(s, t, m) * (t - s) * m
    assert torch.allclose(adv, expected)


def test_opd_is_sod_with_unit_weights():
    s, t, m = random_case(4, 30, seed=2)
    a = torch.randn(4, dtype=torch.float64)
    adv, _, w, _, _ = distill_advantages("opd", a, s, t, m, cfg())
    assert torch.allclose(adv, a[:, None] * m + (t - s) * m) and torch.equal(w, m.to(w.dtype))


def test_gated_mode_pulls_wrong_samples_harder():
    s, t, m = random_case(2, 10, seed=4)
    a = torch.tensor([1.0, -1.0], dtype=torch.float64)
    adv, r, w, _, _ = distill_advantages("gated", a, s, t, m, cfg())
    beta = 0.1 * torch.sigmoid(-a)
    assert torch.allclose(adv, (a[:, None] + beta[:, None] * r) * m) and beta[1] > beta[0]
    assert torch.allclose(w, beta[:, None] * m)   # the weight on r_t is beta_i, on the model's tokens


def test_opd_with_zero_coef_updates_exactly_like_grpo():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    B, T = 4, 6
    mask = torch.tensor([[1, 1, 0, 1, 1, 0]] * B, dtype=torch.float32)
    old = -torch.rand(B, T)
    teacher = -torch.rand(B, T)
    a = torch.randn(B)
    grpo_adv = a[:, None] * mask
    sod_adv, _, _, _, _ = distill_advantages("opd", a, old, teacher, mask, cfg(coef=0.0))
    assert torch.equal(sod_adv, grpo_adv)
    logits = model(torch.randn(B, T, 3)).log_softmax(-1)[..., 0]
    l1, _ = grpo.policy_loss(logits, old, grpo_adv, mask)
    l2, _ = grpo.policy_loss(logits, old, sod_adv, mask)
    assert torch.equal(l1, l2)


def test_step_records_report_d_and_w_per_turn():
    s, t, m = random_case(1, 20, seed=5)
    m = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    step_id, d = step_divergence(s, t, m)
    w = step_weights(d, step_id)
    traj = SimpleNamespace(steps=[(0, 3), (5, 7), (9, 13)], reward=1.0,
                           turns=[Turn(3, tool_status="error"), Turn(2, tool_status="ok"), Turn(4)])
    r = (t - s) * m
    recs = sod_distill.step_records([traj], step_id, d, w, r, rl_step=1)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert abs(recs[1]["signal"] - r[0, 5:7].mean().item()) < 1e-9
    assert recs[0]["w"] == 1.0 and recs[1]["after_tool_error"] and not recs[0]["after_tool_error"]
    assert abs(recs[2]["w"] - min(((d[0, 1] + 1e-6) / (d[0, 3] + 1e-6)).item(), 1.2)) < 1e-9
    assert [r["previous_failure"] for r in recs] == [None, "code", None]   # only the turn right after it


def test_a_failure_of_the_sandbox_is_told_apart_from_an_error_of_the_code():
    turns = [Turn(1, tool_status="error", sandbox_failure=True), Turn(1, tool_status="ok"),
             Turn(1, tool_status="error", sandbox_failure=False), Turn(1)]
    assert [sod_distill.previous_failure(turns, k) for k in (1, 2, 3, 4)] == [None, "sandbox", None, "code"]


# -----------------------------------------------------------------------------
# One RL loop: with the teacher signal switched off, a distillation step is a GRPO step

@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    """A briefly trained student: its rollouts end at different lengths, so GRPO groups carry signal."""
    out = tmp_path_factory.mktemp("start")
    sft.main(sft.Config(max_steps=20, toy_examples=640, eval_prompts=0, out_dir=str(out)))
    return str(out / "final")


# every GRPO option that touches the step: dynamic sampling, the KL penalty, the overlong penalty (which also
# gives the untrained model's groups unequal rewards), tool shaping, a temperature other than 1
STEP = dict(steps=1, prompts_per_step=4, n_samples=4, max_response_tokens=48, overlong_buffer=48, kl_coef=0.1,
            dynamic_sampling=True, tool_shaping="turns", temperature=0.8, mini_batches=2, micro_batch_size=3,
            eval_before_train=False, eval_prompts=2, eval_n=1, seed=3)


def final_weights(out_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


@pytest.mark.parametrize("mode, signal_off", [("sod", {"coef": 0.0}), ("opd", {"coef": 0.0}),
                                              ("sod", "same teacher")])
def test_a_distillation_step_without_teacher_signal_is_a_grpo_step(start_checkpoint, tmp_path, mode,
                                                                   signal_off):
    grpo.main(grpo.Config(model=start_checkpoint, out_dir=str(tmp_path / "grpo"), **STEP))
    extra = ({"teacher": start_checkpoint} if signal_off == "same teacher"
             else {"teacher": start_checkpoint, **signal_off})
    sod_distill.main(sod_distill.Config(student=start_checkpoint, mode=mode, out_dir=str(tmp_path / mode),
                                        **extra, **STEP))
    a, b = final_weights(tmp_path / "grpo"), final_weights(tmp_path / mode)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    row_a = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    row_b = json.loads((tmp_path / mode / "metrics.jsonl").read_text().splitlines()[-1])
    shared = [k for k in row_a if not k.startswith("t_") and k != "run_id"]
    assert {k: row_a[k] for k in shared} == {k: row_b[k] for k in shared}
    assert row_a["loss"] != 0 and 0 < row_a["kept_trajectories"] <= 16   # the step did train
    if signal_off == "same teacher":
        assert row_b["teacher_signal_mean"] == 0.0 and row_b["d1_mean"] == 0.0


@pytest.mark.parametrize("flags, message", [
    (dict(mode="gated", eps=0.1), "--eps applies to --mode sod"),
    (dict(mode="sod", gated_beta_max=0.5), "--gated_beta_max applies to --mode gated"),
    (dict(mode="opsd_gt", teacher="runs/x"), "--teacher is not used"),
    (dict(mode="sod", model="runs/x"), "--student, not --model"),
    (dict(mode="nope"), "--mode must be one of"),
])
def test_flags_a_mode_would_ignore_are_rejected(flags, message):
    with pytest.raises(SystemExit, match=message):
        sod_distill.main(sod_distill.Config(**flags))


def test_opsd_teachers_read_the_privileged_text_at_the_end_of_the_user_message():
    system = {"role": "system", "content": "S"}
    prompt = data.Prompt([system, {"role": "user", "content": "Q"}], "toy_arith", "7", hint="add first")
    assert sod_distill.privileged_prompt(prompt, "opsd_gt") == [
        system, {"role": "user", "content": "Q\n(The correct final answer is 7.)"}]
    hinted = sod_distill.privileged_prompt(prompt, "opsd_hint")
    assert hinted[1] == {"role": "user", "content": "Q\n(Hint: add first.)"}
    assert prompt.prompt[1]["content"] == "Q"
