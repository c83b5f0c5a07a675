"""
common/sandbox_fusion.py: a client of SandboxFusion's run_code HTTP API, the sandbox the reference runs
code in. common/sandbox.py sends every program here instead of to the local sandbox once it is configured
with a server's url (--sandbox_url): the way to run untrusted code at scale.
"""
import json
import time
import urllib.error
import urllib.request

HTTP_TRIES = 3  # the reference retries only on HTTP 504, 3 tries in all
HTTP_RETRY_DELAY = 1.0  # seconds, doubled after each 504


def run_code(code: str, stdin: str, url: str, timeout: float, memory_mb: int) -> dict:
    """The request of verl/utils/reward_score/sandbox_fusion/utils.py: call_sandbox_api; only HTTP 504 is
    retried. A run that did not finish (a timeout) is status "timeout"; an unreachable or broken server,
    status "error"."""
    url = url.rstrip("/")
    if not url.endswith("/run_code"):
        url += "/run_code"
    payload = json.dumps({"compile_timeout": timeout, "run_timeout": timeout, "code": code,
                          "stdin": stdin or None, "memory_limit_MB": memory_mb, "language": "python",
                          "files": {}, "fetch_files": []}).encode()
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json",
                                                                 "Accept": "application/json"})
    error = {"status": "error", "returncode": None, "stdout": "", "stderr": ""}
    for attempt in range(HTTP_TRIES):
        try:
            with urllib.request.urlopen(request, timeout=2 * timeout + 10) as response:
                answer = json.loads(response.read())
            run = answer.get("run_result") or {}
            if run.get("status") == "Finished":
                return {"status": "finished", "returncode": run.get("return_code"),
                        "stdout": run.get("stdout") or "", "stderr": run.get("stderr") or ""}
            if run.get("status") == "TimeLimitExceeded":
                return dict(error, status="timeout")
            return dict(error, stderr=answer.get("message") or "")
        except urllib.error.HTTPError as e:
            if e.code != 504 or attempt == HTTP_TRIES - 1:
                return dict(error, stderr=f"HTTP {e.code}")
            time.sleep(HTTP_RETRY_DELAY * 2**attempt)
        except Exception as e:  # connection refused, bad JSON, missing keys: the model sees the same text
            return dict(error, stderr=str(e))
    return error
