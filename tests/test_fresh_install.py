"""A fresh machine, as a new user meets rawpaged: clone the repository (no ../shared beside the clone),
`pip install '.[server]'` into a new virtual environment, `rawpaged serve` with no model, and one
completion through the unmodified `openai` client; then SIGTERM stops the server cleanly.

It tests the committed state (a clone sees commits only) and needs the package index; it skips,
saying why, where pip cannot reach it. About a minute with a warm pip cache, three on a cold one.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import ServeProcess

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"

pytestmark = pytest.mark.slow


def run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


def tail(proc: subprocess.CompletedProcess, n: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment without anything pointing at this checkout or its data."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RAWPAGED_TEST_DATA", "NUMBA_CACHE_DIR", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with a clone of this repository installed as a user would, its bin/ returned."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("fresh")
    clone = root / "rawpaged"
    r = run(["git", "clone", "--quiet", REPO_ROOT, clone], 120)
    assert r.returncode == 0, tail(r)
    assert not (clone.parent / "shared").exists()
    venv = root / "venv"
    r = run([sys.executable, "-m", "venv", venv], 120)
    if r.returncode != 0:
        pytest.skip(f"cannot create a virtual environment: {tail(r, 1)}")
    py = venv / "bin" / "python"
    env = clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    probe = run([py, "-m", "pip", "index", "versions", "numba", "--retries", "0", "--timeout", "20"], 90, env=env)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach the package index: {tail(probe, 1)}")
    r = run([py, "-m", "pip", "install", "--progress-bar", "off", f"{clone}[server]"], 420, env=env, cwd=root)
    assert r.returncode == 0, f"pip install failed:\n{tail(r)}"
    return venv


def start_server(venv: Path, cwd: Path, *args: str) -> ServeProcess:
    """`rawpaged serve` from the fresh environment, with nothing of this checkout in its environment."""
    return ServeProcess([str(venv / "bin" / "rawpaged"), "serve", *args], cwd=cwd,
                        env=clean_env(NUMBA_CACHE_DIR=str(cwd / "numba_cache")))


def stop(server: ServeProcess) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    return server.exit_status(60)


def test_clone_install_serve_demo_model(installed, tmp_path):
    openai = pytest.importorskip("openai")
    from rawpaged import LLM, SamplingParams
    from rawpaged.hub import DEMO_MODEL

    server = start_server(installed, tmp_path, "--port", str(free_port()))
    try:
        server.wait_ready(180)
        notice = next(line for line in server.lines if "demo model" in line)
        # the installed package's own copy of the model: no ../shared, no checkout on the path
        site = (installed / "lib").resolve()
        assert "using the demo model stories260K" in notice and str(site) in notice, notice
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)
        model = client.models.list().data[0].id
        assert model == "stories260K"
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
        want = LLM(DEMO_MODEL, device="cpu", kv_cache_memory=8 << 20).generate(
            [PROMPT], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
        assert r.choices[0].text == want.text and r.usage.completion_tokens == len(want.token_ids)
        assert r.choices[0].finish_reason == want.finish_reason
    finally:
        status = stop(server)
    assert status == 0, server.lines
    assert any("shutting down" in line for line in server.lines), server.lines
