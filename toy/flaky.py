"""
toy/flaky.py: a sandbox that fails, or stalls, now and then: the toy's --tool_failure_rate and
--tool_latency_rate.

Each wraps the tool as a rollout calls it (one trajectory's calls of a turn in, one tools.Reply out, with the
turn's key). A failing turn shows the model what the authors' tool shows for a sandbox timeout or failure
("no stdout here"), and its reply says that the sandbox failed, not the code, so that the records can tell the
two apart. A stalling turn sleeps first, as a call that runs long. Whether a turn fails or stalls is drawn from
the rollout's seed and the turn's key alone, so it does not depend on the order in which calls happen to run.
"""
import random
import time
from dataclasses import dataclass

import tools
from common.cli import arg


@dataclass
class Faults:
    """The toy's flaky sandbox: transient failures and stalls of tool calls (toy options)."""
    tool_failure_rate: float = arg(0.0, "fraction of tool calls that fail transiently ('no stdout here'), "
                                        "a toy option")
    tool_latency_rate: float = arg(0.0, "fraction of tool calls that first sleep --tool_latency_s (a toy option, "
                                        "to measure how rollouts wait on slow calls)")
    tool_latency_s: float = arg(6.0, "seconds a slow tool call sleeps (with --tool_latency_rate)")


def draw(seed: int | None, what: str, key) -> float:
    """A uniform number that belongs to one turn of one trajectory (fresh randomness without a seed)."""
    return random.random() if seed is None else random.Random(f"{seed}:{what}:{key}").random()


def flaky(call_tool, rate: float, seed: int | None):
    """call_tool, with transient failures of the sandbox at `rate`: a trajectory's calls of a turn fail
    together."""
    if rate <= 0:
        return call_tool

    def call(calls, key=None) -> tools.Reply:
        reply = call_tool(calls, key)
        if draw(seed, "fail", key) < rate:
            return tools.Reply([tools.NO_STDOUT] * len(reply.texts), sandbox_failure=True)
        return reply
    return call


def slow(call_tool, rate: float, seconds: float, seed: int | None):
    """call_tool, sleeping `seconds` first at `rate`: a stalled or long-running call."""
    if rate <= 0:
        return call_tool

    def call(calls, key=None) -> tools.Reply:
        if draw(seed, "slow", key) < rate:
            time.sleep(seconds)
        return call_tool(calls, key)
    return call
