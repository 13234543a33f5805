"""The Python and HTTP examples run as a user would run them, against the real model."""

import os
import subprocess
import sys

from conftest import GENAI_MODEL, MODEL, ROOT


def run(cmd, **env):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_python_binding_example():
    out = run(
        [sys.executable, str(ROOT / "examples/python/chat.py"), str(GENAI_MODEL)],
        LIBCHAT_PATH=os.environ.get("LIBCHAT_PATH", str(ROOT / "target/release/libchat.so")),
    )
    assert "Paris" in out and "completion tokens]" in out


def test_http_examples(chatd):
    out = run(["bash", str(ROOT / "examples/http/curl.sh")], CHATD_URL=chatd)
    assert '"chat.completion"' in out and "data: [DONE]" in out and '"status":"ok"' in out
    out = run([sys.executable, str(ROOT / "examples/http/openai_client.py")], CHATD_URL=chatd)
    assert MODEL.name in out and "Paris" in out
