"""`make lab` starts JupyterLab - as root too (containers, rented GPU machines) - and its kernel is the project's.

Runs the Makefile target itself (without re-installing: ``-o .venv/.installed``), waits for the server's REST API,
lists the kernelspecs, starts the default kernel and executes code in it over the kernel's websocket: the kernel
must import ``bilevel_ssl`` from this checkout and run on this interpreter.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(port: int, path: str, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


async def _execute(port: int, kernel_id: str, code: str, timeout: float = 60.0) -> str:
    """Send one execute_request on the kernel's websocket; return what it printed on stdout."""
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={TOKEN}")
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3"},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False}}))
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await asyncio.wait_for(ws.read_message(), timeout=deadline - time.monotonic())
        assert raw is not None, "the kernel's websocket closed"
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise AssertionError(f"kernel error: {msg['content']['ename']}: {msg['content']['evalue']}")
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    ws.close()
    return "".join(out)


@pytest.mark.skipif(sys.platform == "win32", reason="make and POSIX process groups")
def test_make_lab_serves_the_projects_kernel(tmp_path):
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    cmd = ["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", f"BIN={bin_dir}", "lab",
           f"LAB_ARGS=--no-browser --port={port} --ServerApp.port_retries=0 --IdentityProvider.token={TOKEN}"]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        specs, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                specs = _api(port, "kernelspecs")
                break
            except OSError:
                time.sleep(0.5)
        if specs is None:
            proc.kill()
            out = proc.stdout.read()
            pytest.fail(f"`make lab` did not serve on port {port} (exit {proc.poll()}):\n{out[-3000:]}")
        assert specs["default"] in specs["kernelspecs"], specs
        kernel = _api(port, "kernels", "POST", {"name": specs["default"]})
        printed = asyncio.run(_execute(port, kernel["id"], "import sys, bilevel_ssl; "
                                                           "print(sys.prefix); print(bilevel_ssl.__file__)"))
        prefix, package = printed.split()
        assert prefix == sys.prefix, printed  # the same environment (the venv), not some other python3
        assert Path(package).resolve().is_relative_to(ROOT / "lib"), printed
        _api(port, f"kernels/{kernel['id']}", "DELETE")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
