"""
common/function_harness.py: the end of the program that grades a function problem (common/code_tests.py), a
program text, not a module to import.

code_tests.py reads this file and appends everything below the marker line to the preamble of star imports
(which supplies json, sys and traceback) and the solution, with each FN_NAME replaced by repr(fn_name). The
harness reads one JSON value per line of stdin, calls the function (a top-level one, else
Solution().fn_name), and prints the result: json.dumps for dict, list, tuple, None and bool, str() for
anything else; a failure prints its traceback to stderr, nothing to stdout, and exits 0.
"""
# ---- the harness: everything below this line, byte for byte ----


def _sod_call_function():
    raw = sys.stdin.read()
    try:
        args = [json.loads(line) for line in raw.split("\n")] if raw.strip() else []
        target = globals()[FN_NAME] if FN_NAME in globals() else getattr(globals()["Solution"](), FN_NAME)
        result = target(*args)
    except BaseException:
        traceback.print_exc()
        return
    if isinstance(result, (dict, list, tuple)) or result is None or isinstance(result, bool):
        print(json.dumps(result))
    else:
        print(str(result))


_sod_call_function()
