"""Starts the real chatd binary on the real SmolLM2 model for the Python client tests."""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"
CHATD = pathlib.Path(os.environ.get("CHATD_BIN", ROOT / "target" / "release" / "chatd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def chatd():
    """Base URL of a running daemon; stopped when the session ends."""
    assert CHATD.exists(), f"{CHATD} is missing: build it with `cargo build --release`"
    assert (MODEL / "model.onnx").exists(), f"the test model is needed at {MODEL}"
    port = free_port()
    log = open(ROOT / "target" / "pytest-chatd.log", "w")
    proc = subprocess.Popen(
        [str(CHATD), "--model", str(MODEL), "--listen", f"127.0.0.1:{port}", "--threads", "2"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"chatd exited with {proc.returncode}; see target/pytest-chatd.log")
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("chatd did not become healthy in 60 s")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
