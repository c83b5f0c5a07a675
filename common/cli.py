"""
common/cli.py: a stage's config dataclass as command-line flags, and what `python FILE.py` does around main.

Every stage declares its settings as a dataclass whose fields are made with `arg(default, help)`; `parse_args`
turns each field into one flag. A field made with `not_a_flag` is a setting the stage fixes itself: it gets no
flag, so `--help` lists only what the stage accepts.
"""
import argparse
import logging
import os
import sys
from dataclasses import MISSING, field, fields
from pathlib import Path

from common import cpu_kernels


def arg(default, help: str):
    """A config field with its command-line help string (every stage's config is a dataclass of these)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})



def not_a_flag(default, why: str):
    """A config field that the stage sets itself and the command line cannot change."""
    return field(default=default, metadata={"help": why, "flag": False})

def parse_bool(text: str) -> bool:
    value = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value[text.lower()]


def declared_by(cls) -> dict[str, type]:
    """Each field's topic: the class that first declares it (a stage's config inherits the small configs of
    the loop, the tool, the reward, the toy's faults, ...; a subclass may change a default, not the topic)."""
    owner = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            owner.setdefault(name, klass)
    return owner


def parse_args(cls, argv=None):
    """Dataclass -> argparse flags, one per field, listed by `--help` under the heading of the config that
    declares it (the stage's own first). A bool is `--flag`, `--no-flag` or `--flag true|false`."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or "").strip())
    owner, groups = declared_by(cls), {}
    for klass in [cls, *(k for k in cls.__mro__[1:] if k in owner.values())]:
        title = (klass.__doc__ or "").strip().split("\n")[0].rstrip(".") if klass is not cls else "this stage"
        groups[klass] = parser.add_argument_group(title if klass is cls else f"{title} ({klass.__name__})")
    for f in fields(cls):
        if not f.metadata.get("flag", True):
            continue
        group = groups[owner[f.name]]
        default = f.default if f.default_factory is MISSING else f.default_factory()
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help strings with %
        if default != "" and "default" not in text:
            text += f" (default: {default})".replace("%", "%%")
        if isinstance(default, bool):
            group.add_argument(f"--{f.name}", nargs="?", const=True, default=default, type=parse_bool,
                               metavar="true|false", help=text)
            group.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
        elif isinstance(default, list):
            group.add_argument(f"--{f.name}", nargs="+", default=default, help=text)
        else:
            group.add_argument(f"--{f.name}", type=type(default), default=default, help=text)
    return cls(**vars(parser.parse_args(argv)))


def reject_unused(cfg, names: list[str], why: str):
    """A flag that is accepted and ignored is a bug: refuse the ones that `why` makes meaningless."""
    for name in names:
        if getattr(cfg, name) != getattr(type(cfg), name):
            raise SystemExit(f"--{name} is not used {why}")


def quiet_libraries():
    """transformers' per-load progress bars and notices would drown each stage's own output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_script(main, cls):
    """What `python FILE.py` does: flags -> config -> main, with logging, and a one-line stop on Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_libraries()
    cfg = parse_args(cls)
    cpu_kernels.configure(cpu_kernels.mode_from_env())  # before any tensor: $SOD_CPU_KERNELS, native if unset
    try:
        main(cfg)
    except KeyboardInterrupt:
        argv = [a for a in sys.argv[1:] if a not in ("--resume", "--no-resume")]
        resume = "" if not any(f.name == "resume" for f in fields(cls)) else " --resume"
        print(f"\ninterrupted; resume with: "
              f"python {Path(sys.argv[0]).name} {' '.join(argv)}{resume}".rstrip(),
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

