"""Server fixtures: scripted stand-in HTTP servers on 127.0.0.1, and a real vLLM server."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that cancelled its request (a failed problem's siblings, a timeout under load)
        # breaks the pipe: that is the client's choice, not a server error worth a traceback
        # on the test's stderr, which tests read for the client's own tracebacks.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class StandIn:
    """A stand-in server: `handler(method, path, body) -> (status, json_or_text)`; every request
    is recorded in `requests` as (method, path, body)."""

    def __init__(self, handler):
        self.handler, self.requests = handler, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def _serve(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                outer.requests.append((method, self.path, body))
                status, out = outer.handler(method, self.path, body)
                data = out.encode() if isinstance(out, str) else json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(out, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def log_message(self, *a):
                pass

        self.httpd = _Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def posts(self, path: str) -> list[dict]:
        return [b for m, p, b in self.requests if m == "POST" and p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stand_in():
    """Factory: stand_in(handler) -> a running StandIn; all closed after the test."""
    made = []

    def make(handler):
        s = StandIn(handler)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_python() -> Path | None:
    """$ETS_VLLM_PYTHON, else /work/.venv-vllm/bin/python, else ~/.cache/ets/venv-vllm/bin/python."""
    cands = [os.environ.get("ETS_VLLM_PYTHON"), "/work/.venv-vllm/bin/python",
             str(Path.home() / ".cache" / "ets" / "venv-vllm" / "bin" / "python")]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """A real vLLM server for the default model on 127.0.0.1 (small KV cache); skipped with the
    reason when no vLLM venv is found."""
    from ets.serve import has_vllm, start_vllm_server

    python = vllm_python()
    if python is None or not has_vllm(python):
        pytest.skip("no vLLM venv: set ETS_VLLM_PYTHON (or run .ci/vllm-setup.sh)")
    from ets.models import default_model_dir

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with start_vllm_server(default_model_dir(), free_port(), python, kv_cache_gb=1, block_size=32,
                           log_path=log) as server:
        yield server


# The default model as a step-pooling "PRM": a classification head vLLM adds (untrained, so
# scores mean nothing) and step tag <|endoftext|> (id 0). It checks the wire, not the scores.
POOLING_ARGS = ("--runner", "pooling", "--convert", "classify", "--pooler-config",
                '{"task": "token_classify", "tok_pooling_type": "STEP", "step_tag_id": 0}')
POOLING_STEP_TAG = "<|endoftext|>"


@pytest.fixture  # per test: stopped before the generation server starts (two cores)
def vllm_pooling_server(tmp_path_factory):
    from ets.serve import has_vllm, start_vllm_server

    python = vllm_python()
    if python is None or not has_vllm(python):
        pytest.skip("no vLLM venv: set ETS_VLLM_PYTHON (or run .ci/vllm-setup.sh)")
    from ets.models import default_model_dir

    log = tmp_path_factory.mktemp("vllm-pooling") / "vllm.log"
    with start_vllm_server(default_model_dir(), free_port(), python, kv_cache_gb=1, log_path=log,
                           extra_args=POOLING_ARGS) as server:
        yield server


def toy_dataset(tmp_path, n: int = 3, question=lambda i: f"problem {i}: 6*7?", all_problems: bool = True) -> list[str]:
    """A JSONL of `n` toy problems (ids t0..t{n-1}, gold 42, `question(i)`) and the flags that run
    on it with run directories under tmp_path/runs (all_problems: `--limit 0`)."""
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": question(i), "answer": "42"}) + "\n"
                            for i in range(n)))
    args = ["--dataset", str(path), "--id-field", "id", "--runs-dir", str(tmp_path / "runs")]
    return args + (["--limit", "0"] if all_problems else [])
