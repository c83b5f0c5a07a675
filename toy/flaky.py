"""
toy/flaky.py: a sandbox that fails now and then, for the toy's --tool_failure_rate.

It wraps the tool as a rollout calls it (a turn's calls, grouped per trajectory, in; one tools.Reply per
trajectory out). Each trajectory's calls of a turn fail together with probability `rate`: the model is then
shown what the authors' tool shows for a sandbox timeout or failure ("no stdout here"), and the reply says that
the sandbox failed, not the code, so that the records can tell the two apart.
"""
import random

import tools


def flaky(call_tools, rate: float, seed: int | None):
    """call_tools, with transient failures of the sandbox at `rate` (one draw per trajectory and turn, from a
    generator of its own seeded by the rollout's seed)."""
    rng = random.Random(None if seed is None else seed + 17)

    def call(groups: list[list[dict]]) -> list[tools.Reply]:
        replies = call_tools(groups)
        return [tools.Reply([tools.NO_STDOUT] * len(r.texts), sandbox_failure=True) if rng.random() < rate
                else r for r in replies]
    return call
