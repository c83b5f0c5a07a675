"""Plumbing below the stage files: one topic per module."""
import sys

# The lowest Python the project supports, and CI tests: 3.11 (asyncio's timeouts, among others, are the builtin
# TimeoutError from 3.11 on). Every stage imports this package, so an older Python stops here, not deep in a run.
if sys.version_info < (3, 11):
    raise SystemExit(f"this project needs Python 3.11 or newer, not {sys.version.split()[0]}")
