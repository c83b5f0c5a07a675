"""The step weights and the SOD advantage, against the authors' loop written out from their code."""
import time
from types import SimpleNamespace

import pytest
import torch

import grpo
import sod_distill
from sod_distill import distill_advantages, step_index, step_weights


def reference_step_weights(student_lp, teacher_lp, mask, eps=1e-6, delta=0.2):
    """The authors' compute_stepwise_opd_weights: steps = runs of mask 1 found token by token,
    a running product of ratios, the clip applied when writing each step's weight."""
    B, T = mask.shape
    weights = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        steps, start = [], None
        for t in range(T):
            if mask[b, t].item() == 1 and start is None:
                start = t
            elif mask[b, t].item() == 0 and start is not None:
                steps.append((start, t))
                start = None
        if start is not None:
            steps.append((start, T))
        if not steps:
            continue
        d = []
        for s, e in steps:
            d.append(sum(abs(student_lp[b, t].item() - teacher_lp[b, t].item()) for t in range(s, e)) / (e - s))
        cum_prod = 1.0
        for k, (s, e) in enumerate(steps):
            if k == 0:
                w = 1.0
            else:
                cum_prod *= (d[k - 1] + eps) / (d[k] + eps)
                w = min(cum_prod, 1 + delta)
            for t in range(s, e):
                weights[b, t] = w
    return weights


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
    assert torch.allclose(step_weights(s, t, m), reference_step_weights(s, t, m), atol=1e-9)


def test_step_weights_edge_cases_equal_reference():
    s, t, _ = random_case(5, 12, seed=9)
    mask = torch.tensor([
        [0] * 12,                                  # empty row
        [1] * 12,                                  # one step
        [1, 0] * 6,                                # steps of one token
        [0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0],      # holes for tool tokens
        [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1],      # a step running to the end
    ], dtype=torch.float32)
    assert torch.allclose(step_weights(s, t, mask), reference_step_weights(s, t, mask), atol=1e-9)
    zero = step_weights(s, s.clone(), mask)  # zero divergence: every ratio is eps/eps
    assert torch.allclose(zero, reference_step_weights(s, s.clone(), mask)) and torch.equal(zero, mask.double())


def test_weights_telescope_to_first_step_ratio():
    # d = 0.1, 0.4, 0.05 on three steps: w = 1, 0.1/0.4, min(0.1/0.05, 1.2)
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1]], dtype=torch.float32)
    teacher = torch.zeros(1, 7, dtype=torch.float64)
    student = -torch.tensor([[0.1, 0.1, 0, 0.4, 0, 0.05, 0.05]], dtype=torch.float64)
    w = step_weights(student, teacher, mask, eps=0.0, delta=0.2)
    assert torch.allclose(w, torch.tensor([[1, 1, 0, 0.25, 0, 1.2, 1.2]], dtype=torch.float64))


def test_step_index_numbers_runs_of_mask_one():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1]])
    assert step_index(mask).tolist() == [[0, 1, 1, 0, 2, 0, 0, 3]]


def test_step_weights_at_least_100x_faster_than_reference_at_64x8192():
    s, t, m = random_case(64, 8192, p_switch=0.01, seed=3)
    ours_s, threads = float("inf"), torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, like the reference loop (and immune to a busy second core)
    try:
        for _ in range(3):  # best of three
            t0 = time.perf_counter()
            ours = step_weights(s, t, m)
            ours_s = min(ours_s, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    rows = 4  # the reference loop on 4 of the 64 rows, scaled: it is linear in rows
    t0 = time.perf_counter()
    ref = reference_step_weights(s[:rows], t[:rows], m[:rows])
    ref_s = (time.perf_counter() - t0) * 64 / rows
    assert torch.allclose(ours[:rows], ref, atol=1e-6)
    print(f"step_weights 64x8192: {ours_s * 1e3:.1f} ms, reference ~{ref_s:.1f} s, speed-up {ref_s / ours_s:.0f}x")
    assert ref_s / ours_s >= 100


def cfg(**kw):
    base = dict(coef=1.0, eps=1e-6, delta=0.2, gated_gamma=1.0, gated_beta_min=0.0, gated_beta_max=0.1)
    return SimpleNamespace(**{**base, **kw})


def test_sod_advantage_is_grpo_plus_weighted_teacher_signal():
    s, t, m = random_case(4, 30, seed=1)
    a = torch.randn(4, dtype=torch.float64)
    adv, r, w = distill_advantages("sod", a, s, t, m, cfg(coef=0.7))
    expected = a[:, None] * m + 0.7 * step_weights(s, t, m) * (t - s) * m
    assert torch.allclose(adv, expected)


def test_opd_is_sod_with_unit_weights():
    s, t, m = random_case(4, 30, seed=2)
    a = torch.randn(4, dtype=torch.float64)
    adv, _, _ = distill_advantages("opd", a, s, t, m, cfg())
    assert torch.allclose(adv, a[:, None] * m + (t - s) * m)


def test_gated_mode_pulls_wrong_samples_harder():
    s, t, m = random_case(2, 10, seed=4)
    a = torch.tensor([1.0, -1.0], dtype=torch.float64)
    adv, r, _ = distill_advantages("gated", a, s, t, m, cfg())
    beta = 0.1 * torch.sigmoid(-a)
    assert torch.allclose(adv, (a[:, None] + beta[:, None] * r) * m) and beta[1] > beta[0]


def test_opd_with_zero_coef_updates_exactly_like_grpo():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    B, T = 4, 6
    mask = torch.tensor([[1, 1, 0, 1, 1, 0]] * B, dtype=torch.float32)
    old = -torch.rand(B, T)
    teacher = -torch.rand(B, T)
    a = torch.randn(B)
    grpo_adv = a[:, None] * mask
    sod_adv, _, _ = distill_advantages("opd", a, old, teacher, mask, cfg(coef=0.0))
    assert torch.equal(sod_adv, grpo_adv)
    logits = model(torch.randn(B, T, 3)).log_softmax(-1)[..., 0]
    l1, _ = grpo.policy_loss(logits, old, grpo_adv, mask)
    l2, _ = grpo.policy_loss(logits, old, sod_adv, mask)
    assert torch.equal(l1, l2)


def test_step_records_report_d_and_w_per_turn():
    s, t, m = random_case(1, 20, seed=5)
    m = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    step_id, d, _ = sod_distill.step_divergence(s, t, m)
    w = step_weights(s, t, m)
    traj = SimpleNamespace(steps=[(0, 3), (5, 7), (9, 13)], reward=1.0,
                           turns=[{"tokens": 3, "tool_status": "error"}, {"tokens": 2, "tool_status": "ok"}, {"tokens": 4}])
    recs = sod_distill.step_records([traj], step_id, d, w, rl_step=1)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["w"] == 1.0 and recs[1]["after_tool_error"] and not recs[0]["after_tool_error"]
    assert abs(recs[2]["w"] - min(((d[0, 1] + 1e-6) / (d[0, 3] + 1e-6)).item(), 1.2)) < 1e-9
