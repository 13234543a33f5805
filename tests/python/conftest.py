"""Starts the real chatd binary on the real SmolLM2 model for the Python client tests."""

import json
import os
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"
GENAI_MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-genai"
CHATD = pathlib.Path(os.environ.get("CHATD_BIN", ROOT / "target" / "release" / "chatd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_chatd(model_dir, log_name):
    """Starts chatd on `model_dir`; returns (process, base URL) once /health answers."""
    assert CHATD.exists(), f"{CHATD} is missing: build it with `cargo build --release`"
    assert model_dir.exists(), f"the test model is needed at {model_dir}"
    port = free_port()
    log = open(ROOT / "target" / log_name, "w")
    proc = subprocess.Popen(
        [str(CHATD), "--model", str(model_dir), "--listen", f"127.0.0.1:{port}", "--threads", "2"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"chatd exited with {proc.returncode}; see target/{log_name}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if json.load(r)["status"] == "ok":
                    return proc, base
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("chatd did not become healthy in 60 s")
        time.sleep(0.1)


def post_json(base, path, body):
    """POSTs `body` as JSON; returns (status, parsed answer), errors included."""
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def first_parting(got, got_finish, want, want_finish):
    """The first step where two greedy runs chose differently: where their tokens differ, or where
    one stopped on its end token (which logprobs and token lists leave out) while the other went
    on; None where they agree as far as both go."""
    differ = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if differ is not None:
        return differ
    shorter_finish = got_finish if len(got) < len(want) else want_finish
    return min(len(got), len(want)) if len(got) != len(want) and shorter_finish == "stop" else None


def stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def chatd():
    """Base URL of chatd on the Optimum-layout model."""
    proc, base = start_chatd(MODEL, "pytest-chatd.log")
    yield base
    stop(proc)


@pytest.fixture(scope="session")
def chatd_genai():
    """Base URL of chatd on the onnxruntime-genai-layout model."""
    proc, base = start_chatd(GENAI_MODEL, "pytest-chatd-genai.log")
    yield base
    stop(proc)
