"""evaluate.py: the metrics against their definitions and the reference's semantics."""
import itertools
import math
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

import evaluate
from evaluate import bootstrap_best_at_k, bootstrap_maj_at_k, maj_at_k, majority_vote_acc, pass_at_k
from rollout import Turn


def test_pass_at_k_is_exact_for_every_n_up_to_64():
    for n in range(1, 65):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == float(exact), (n, c, k)


def test_pass_at_k_edge_values():
    assert pass_at_k(32, 0, 32) == 0.0 and pass_at_k(32, 32, 1) == 1.0 and pass_at_k(32, 1, 32) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_does_not_overflow_at_n_1024():
    values = [pass_at_k(1024, c, 512) for c in (0, 1, 2, 10, 500, 1024)]
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values)
    assert values == sorted(values) and values[1] == pytest.approx(0.5)


def test_pass_at_k_rejects_impossible_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def reference_maj(data):
    """verl's calc_maj_val: vote2vals in insertion order, max() keeps the first maximum."""
    vote2vals = defaultdict(list)
    for d in data:
        vote2vals[d["pred"]].append(d["val"])
    vote2cnt = {k: len(v) for k, v in vote2vals.items()}
    return vote2vals[max(vote2cnt, key=vote2cnt.get)][0]


def reference_bootstrap(data, subset_size, reduce_fns, n_bootstrap=1000, seed=42):
    """verl's bootstrap_metric."""
    np.random.seed(seed)
    lsts = [[] for _ in reduce_fns]
    for _ in range(n_bootstrap):
        idxs = np.random.choice(len(data), size=subset_size, replace=True)
        sample = [data[i] for i in idxs]
        for i, fn in enumerate(reduce_fns):
            lsts[i].append(fn(sample))
    return [float(np.mean(lst)) for lst in lsts]


def test_majority_vote_ties_go_to_the_first_seen_answer():
    assert majority_vote_acc(["7", "8", "8", "7"], [True, False, False, True]) is True
    assert majority_vote_acc(["8", "7", "7", "8"], [False, True, True, False]) is False


def test_empty_predictions_vote_like_any_other():
    assert majority_vote_acc(["", "", "5"], [False, False, True]) is False


@pytest.mark.parametrize("preds, accs", [
    (["1", "2", "2", "", "1", "1", "3", ""], [True, False, False, False, True, True, False, False]),
    (["", "", "", "4"], [False, False, False, True]),
    (["a", "b", "c", "d", "e"], [False, True, False, False, True]),
])
def test_majority_vote_matches_reference_on_any_order(preds, accs):
    for perm in itertools.islice(itertools.permutations(range(len(preds))), 200):
        data = [{"pred": preds[i], "val": accs[i]} for i in perm]
        assert majority_vote_acc([d["pred"] for d in data], [d["val"] for d in data]) == reference_maj(data)


def test_bootstrap_best_and_maj_match_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 8
        preds = [str(x) for x in rng.integers(0, 3, n)]
        accs = [p == "1" for p in preds]
        best_ref, = reference_bootstrap([float(a) for a in accs], n, [np.max])
        maj_ref, = reference_bootstrap([{"pred": p, "val": a} for p, a in zip(preds, accs)], n,
                                       [reference_maj])
        assert bootstrap_best_at_k(accs, n) == pytest.approx(best_ref)
        assert bootstrap_maj_at_k(preds, accs, n) == pytest.approx(maj_ref)


def test_best_at_k_bootstrap_estimates_one_minus_miss_rate_to_the_k():
    accs = [True] * 2 + [False] * 30
    assert bootstrap_best_at_k(accs, 32) == pytest.approx(1 - (30 / 32) ** 32, abs=0.03)
    assert pass_at_k(32, 2, 32) == 1.0   # the unbiased value differs: that is why both are reported


def test_maj_at_k_is_the_exact_mean_over_subsets():
    preds, accs = ["1", "2", "1", "2", ""], [True, False, True, False, False]
    subsets = list(itertools.combinations(range(5), 3))
    expected = np.mean([majority_vote_acc([preds[i] for i in s], [accs[i] for i in s]) for s in subsets])
    assert maj_at_k(preds, accs, 3) == pytest.approx(expected)
    assert maj_at_k(preds, accs, 5) == float(majority_vote_acc(preds, accs))


def test_maj_at_k_falls_back_to_a_seeded_estimate_for_large_n():
    preds = ["1"] * 20 + ["2"] * 44
    accs = [True] * 20 + [False] * 44
    v = maj_at_k(preds, accs, 32)
    assert v == maj_at_k(preds, accs, 32) and v < 0.05


def test_problem_metrics_report_every_metric():
    samples = {0: [("1", True), ("2", False), ("1", True), ("", False)], 1: [("3", False)] * 4}
    m = evaluate.problem_metrics(samples)
    assert m["avg@4"] == pytest.approx(0.25) and m["pass@1"] == pytest.approx(0.25)
    assert m["pass@4"] == pytest.approx(0.5) and m["maj@4"] == pytest.approx(0.5)
    assert {"pass@2", "best@4(bootstrap)", "maj@4(bootstrap)"} <= set(m)


def test_a_failed_call_is_resent_only_when_the_next_turn_sends_the_same_code():
    def turn(call, status=None):
        return Turn(tokens=1, tool_call=call, tool_status=status)
    retried = [turn("print(1 + 2)", "error"), turn("print(1 + 2)", "ok"), turn(None)]
    moved_on = [turn("print(1 + 2)", "error"), turn("print(7 + 2)", "ok"), turn(None)]
    gave_up = [turn("print(1 + 2)", "ok"), turn("print(3 * 2)", "error"), turn(None)]
    cut_off = [turn("print(1 + 2)", "error")]                     # no turn after it: nothing to count
    assert evaluate.resent_calls(retried) == [True]
    assert evaluate.resent_calls(moved_on) == [False]
    assert evaluate.resent_calls(gave_up) == [False]
    assert evaluate.resent_calls(cut_off) == []
    assert evaluate.resent_calls(retried + moved_on) == [True, False]


def test_missing_model_path_fails_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(evaluate.Config(model=[str(tmp_path / "nope")], out_dir=str(tmp_path)))


def test_unknown_columns_are_named(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"question": "x", "label": 1}\n')
    with pytest.raises(SystemExit, match="matches no prompt wrapper"):
        evaluate.load_benchmarks(evaluate.Config(data=str(path)))
