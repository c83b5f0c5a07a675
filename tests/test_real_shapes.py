"""scripts/real_shapes.py reads the README's real-recipe commands and states a rule for each of their flags: a
flag added to those commands without a rule fails here, before anyone runs the long script. No model loads."""
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("real_shapes", REPO / "scripts" / "real_shapes.py")
real_shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real_shapes)

README = (REPO / "README.md").read_text()
LOCAL = real_shapes.local_names(Path("/w/models/student"), Path("/w/models/teacher"), Path("/w/data"))


def gpu_block() -> str:
    return README.split("## The real recipe on GPUs", 1)[1].split("```bash", 1)[1].split("```", 1)[0]


def test_every_python_command_of_the_gpu_block_is_found():
    commands = real_shapes.readme_commands(README)
    # counted independently: lines of the block that start a python command
    assert len(commands) == len(re.findall(r"^python ", gpu_block(), flags=re.M))
    assert [argv[1] for argv in commands] == ["sft.py", "grpo.py", "sod_distill.py", "evaluate.py"]


def test_continuation_lines_are_joined():
    (sft,) = [argv for argv in real_shapes.readme_commands(README) if argv[1] == "sft.py"]
    assert "--grad_checkpointing" in sft and "--model" in sft  # the last line and the first


def test_each_flag_is_kept_or_changed_by_a_stated_rule():
    for argv in real_shapes.readme_commands(README):
        script = argv[1]
        stage_argv, changes = real_shapes.adapt(argv, LOCAL)
        here = dict(real_shapes.command_flags(["python", *stage_argv]))
        changed = {c.split(" --", 1)[1].split(":")[0] for c in changes}
        for name, value in real_shapes.command_flags(argv):
            rule = real_shapes.RULES[script][name]
            assert name in here, f"{script} --{name} was dropped"
            if rule == real_shapes.KEEP:
                assert here[name] == value, f"{script} --{name}"
            elif rule == real_shapes.LOCAL:
                assert here[name] == ",".join(LOCAL[x] for x in value.split(","))
            else:  # a shrink: printed, and smaller than the README's value
                assert name in changed and float(here[name]) < float(value), f"{script} --{name}"
        assert changed <= {n for n, _ in real_shapes.command_flags(argv)} | set(real_shapes.ADDED.get(script, {}))


def test_a_readme_flag_without_a_rule_stops_the_script():
    with pytest.raises(SystemExit, match="no rule for --new_flag"):
        real_shapes.adapt(["python", "sft.py", "--model", "Qwen/Qwen3-0.6B", "--new_flag", "1"], LOCAL)
    with pytest.raises(SystemExit, match="no local stand-in"):
        real_shapes.adapt(["python", "sft.py", "--model", "Qwen/Qwen3-8B"], LOCAL)
    with pytest.raises(SystemExit, match="knows only"):
        real_shapes.adapt(["python", "pipeline.py", "--quick"], LOCAL)


def test_the_overlong_buffer_keeps_its_share_of_the_response_budget():
    assert real_shapes.overlong_buffer("1024", {"max_response_tokens": "20480"}) == str(
        round(1024 * real_shapes.MAX_RESPONSE_TOKENS / 20480))


def test_parameter_counts_of_the_real_shapes():
    # the published sizes: Qwen3-0.6B 0.6B (0.44B without embeddings), 1.7B (1.4B), 4B (3.6B)
    assert round(real_shapes.qwen3_params("qwen3-0.6b") / 1e6) == 596
    assert round(real_shapes.qwen3_params("qwen3-1.7b") / 1e8) == 17
    assert round(real_shapes.qwen3_params("qwen3-4b") / 1e8) == 40
