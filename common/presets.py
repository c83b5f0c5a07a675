"""
common/presets.py: the sizes of pipeline.py's three presets, the short default, --quick and --study.

A preset gives its value to every flag of pipeline.py left unset (-1, or an empty string); a flag given
explicitly wins. --quick also shrinks what no flag of pipeline.py reaches: each SFT and RL stage's own sizes.
"""
from dataclasses import fields, replace

UNSET, UNSET_FRACTION = -1, -1.0  # a numeric flag left to the preset
METHODS = ("grpo", "opd", "sod")  # the student's three RL runs, in the order of --student_rl_lr

PRESETS = {  # every field the presets set; a flag given explicitly wins
    # the knowledge gap of toy/task.py: the teacher's data solves the gap notation with `//` always; the student's
    # shows it in 15% of its problems and solves 1% of those with `//` (the rest read `/` as Python does); the
    # students' RL runs 20 steps, GRPO and SOD at lr 2e-4 and OPD at 3e-4, each method's lr chosen on the
    # validation split of both kernel paths (docs/results.md)
    "default": dict(out_root="runs", seeds="0", seed_student_sft=False, toy_steps="2-4",
                    tool_failure_rate=0.0, teacher_model="toy-teacher", teacher_sft_epochs=6,
                    teacher_direct_frac=0.5, teacher_retry_frac=0.0, teacher_min_call_acc=0.99,
                    teacher_more_epochs=2, teacher_more_lr=1e-3, sft_micro_batch_size=16, student_sft_epochs=6,
                    student_sft_examples=5000, student_gap_share=0.3, student_gap_known=0.01,
                    student_recovery_frac=0.25, student_retry_frac=0.0, student_direct_frac=0.0,
                    max_response_tokens=320, teacher_rl_steps=30, rl_steps=20, student_rl_lr="2e-4,3e-4,2e-4",
                    rl_validation="none", rl_eval_every=0, rl_eval_prompts=64, rl_eval_n=4, eval_n=8,
                    eval_prompts=128),
    "quick": dict(rl_steps=2, teacher_rl_steps=2, eval_n=2, eval_prompts=4,
                  teacher_min_call_acc=0.0),  # three SFT steps pass no check
    # the default's recipe over five seeds, each with its own student SFT, on twice the test problems, with a
    # validation curve every 5 RL steps (docs/results.md, "The study")
    "study": dict(out_root="runs-study", seeds="0,1,2,3,4", seed_student_sft=True, rl_validation="all",
                  rl_eval_every=5, rl_eval_prompts=64, eval_n=8, eval_prompts=256),
}
# --quick, in the stages' own sizes: a handful of SFT steps on a few conversations (sft.Config), and RL steps of
# two prompts x four samples (grpo.Config and sod_distill.Config)
QUICK_SFT = dict(max_steps=3, toy_examples=64, eval_prompts=0)
QUICK_RL = dict(prompts_per_step=2, n_samples=4, eval_prompts=4, eval_n=2)


def student_lrs(text: str) -> dict:
    """--student_rl_lr as method -> learning rate: 'GRPO,OPD,SOD', or one value for all three."""
    try:
        lrs = [float(v) for v in text.split(",")]
    except ValueError:
        lrs = []
    if len(lrs) not in (1, len(METHODS)) or not all(0 < lr < 1 for lr in lrs):
        raise SystemExit(f"--student_rl_lr must be one learning rate or three (GRPO,OPD,SOD), each in (0, 1), "
                         f"not {text!r}")
    return dict(zip(METHODS, lrs * len(METHODS) if len(lrs) == 1 else lrs))


def resolve(cfg):
    """pipeline.py's Config with the preset's value for every field left unset (UNSET, or an empty string)."""
    if cfg.quick and cfg.study:
        raise SystemExit("--quick and --study are two different presets: choose one")
    if cfg.eval_split not in ("test", "valid"):  # checked before any stage trains, not after
        raise SystemExit(f"--eval_split must be test or valid, not {cfg.eval_split!r}")
    if cfg.rl_validation not in ("", "none", "teacher", "all"):
        raise SystemExit(f"--rl_validation must be none, teacher or all, not {cfg.rl_validation!r}")
    preset = dict(PRESETS["default"],
                  **(PRESETS["quick"] if cfg.quick else PRESETS["study"] if cfg.study else {}))
    unset = {f.name: preset[f.name] for f in fields(cfg)
             if f.name in preset and getattr(cfg, f.name) in (UNSET, UNSET_FRACTION, "")
             and not isinstance(getattr(cfg, f.name), bool)}
    flags = {k: True for k in ("seed_student_sft",) if preset[k] and not getattr(cfg, k)}
    if cfg.teacher_only and not cfg.rl_validation:  # the teacher checks report validation before and after GRPO
        unset["rl_validation"] = "teacher"
    resolved = replace(cfg, **unset, **flags)
    given = [f"--{k}" for k in ("rl_eval_every", "rl_eval_prompts", "rl_eval_n") if getattr(cfg, k) != UNSET]
    if resolved.rl_validation == "none" and given:
        raise SystemExit(f"{', '.join(given)}: no RL run evaluates on the validation split "
                         f"(--rl_validation none); add --rl_validation teacher or all")
    student_lrs(resolved.student_rl_lr)  # a malformed value stops the run before any stage trains
    return resolved
