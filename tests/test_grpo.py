"""GRPO's two equations against the reference's loops, and the memory rule of its training step."""
from collections import defaultdict

import pytest
import torch

import grpo
import rollout
from common import models


def reference_group_advantages(rewards, index, eps=1e-6):
    """verl's compute_grpo_outcome_advantage, one reward per trajectory."""
    scores = rewards.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    for idx, vals in id2score.items():
        if len(vals) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            id2mean[idx], id2std[idx] = torch.mean(torch.stack(vals)), torch.std(torch.stack(vals))
    for i in range(len(scores)):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores


def reference_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_low=0.2, clip_high=0.28,
                          clip_c=3.0):
    """verl's compute_policy_loss_vanilla with token-mean aggregation."""
    def masked_mean(v, m):
        return (v * m).sum() / (m.sum() + 1e-8)
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return (masked_mean(pg_losses, response_mask),
            masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask))


@pytest.mark.parametrize("seed", range(5))
def test_group_advantages_equal_reference(seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 6, (40,), generator=g)
    rewards = torch.randn(40, generator=g, dtype=torch.float64)
    rewards[index == 2] = 1.0                                 # a group with all-equal rewards
    index[0], rewards[0] = 99, 0.7                            # a group of one
    ours = grpo.group_advantages(rewards, index)
    assert torch.allclose(ours, reference_group_advantages(rewards, index.tolist()), atol=1e-10)
    assert ours[0].item() == pytest.approx(0.7 / (1 + 1e-6)) and torch.all(ours[index == 2] == 0)


def test_group_advantages_use_unbiased_std():
    adv = grpo.group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    std = torch.tensor([0.0, 1.0]).std()  # unbiased: 0.7071
    assert torch.allclose(adv, torch.tensor([-0.5, 0.5]) / (std + 1e-6))


@pytest.mark.parametrize("seed", range(5))
def test_policy_loss_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 25
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    # ratios well outside the clip range
    new = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 3
    adv[0] = -5.0                                                           # negative, beyond the dual clip
    mask = (torch.rand(B, T, generator=g) > 0.3).double()                   # holes for tool tokens
    loss, stats = grpo.policy_loss(new, old, adv, mask)
    ref_loss, ref_clipfrac = reference_policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(ref_clipfrac.item(), rel=1e-6)
    assert stats["dual_clip_frac"] > 0


def test_policy_loss_gradient_equals_reference():
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(3, 9, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 9, generator=g, dtype=torch.float64) * 4
    mask = (torch.rand(3, 9, generator=g) > 0.2).double()
    a = (old + 0.5 * torch.randn(3, 9, generator=g, dtype=torch.float64)).requires_grad_()
    b = a.detach().clone().requires_grad_()
    grpo.policy_loss(a, old, adv, mask)[0].backward()
    reference_policy_loss(b, old, adv, mask)[0].backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-6)


def test_micro_batches_sum_to_the_mini_batch_token_mean():
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(8, 10, generator=g)
    new = old + 0.1 * torch.randn(8, 10, generator=g)
    adv = torch.randn(8, 10, generator=g)
    mask = (torch.rand(8, 10, generator=g) > 0.5).float()
    whole, _ = grpo.policy_loss(new, old, adv, mask)
    parts = sum(grpo.policy_loss(new[s:s + 3], old[s:s + 3], adv[s:s + 3], mask[s:s + 3],
                                 num_tokens=mask.sum())[0]
                for s in range(0, 8, 3))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)


def test_no_full_vocabulary_float32_tensor_over_the_batch(monkeypatch):
    """Every float32 tensor with the vocabulary as last dimension covers fewer positions than the batch."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = models.load_model("toy-student", device="cpu")
    V = model.get_output_embeddings().weight.shape[0]
    B, T = 8, 300
    ids = torch.randint(0, V, (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    biggest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if (isinstance(o, torch.Tensor) and o.dtype == torch.float32 and o.dim() >= 1
                        and o.shape[-1] == V):
                    biggest.append(o.numel() // V)
            return out

    with Watch():
        lp = rollout.token_logprobs(model, ids, att, max_chunk_tokens=512)     # as in training: with grad
        (-lp.mean()).backward()
        # the old-log-prob pass, with entropy
        with torch.no_grad():
            rollout.token_logprobs(model, ids, att, max_chunk_tokens=512, with_entropy=True)
    assert max(biggest) <= 512 < B * (T - 1)


def reference_filter_groups(rewards, uids):
    """verl/trainer/ppo/ray_trainer.py: _apply_filter_groups with metric seq_reward, re-typed."""
    values, indices = defaultdict(list), defaultdict(list)
    for i, (uid, value) in enumerate(zip(uids, rewards)):
        values[uid].append(value)
        indices[uid].append(i)
    keep = []
    for uid, vals in values.items():
        if len(vals) == 1 or torch.std(torch.tensor(vals), unbiased=False) > 0:
            keep.extend(indices[uid])
    return list(range(len(uids))) if len(keep) in (0, len(uids)) else sorted(keep)


@pytest.mark.parametrize("rewards, groups", [
    ([1.0, 1.0, 0.0, 1.0, 0.5], [0, 0, 1, 1, 2]),     # a group of one is kept
    ([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1]),            # no group carries signal: the whole step is kept
    ([0.2, 0.3, 0.2, 0.2, 0.9, 0.1], [3, 3, 1, 1, 2, 2]),
])
def test_dynamic_sampling_keeps_what_the_authors_filter_keeps(rewards, groups):
    assert (grpo.dynamic_sampling_keep(torch.tensor(rewards), torch.tensor(groups))
            == reference_filter_groups(rewards, groups))
