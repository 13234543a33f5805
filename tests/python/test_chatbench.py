"""../shared/tools/chatbench.py --check finds no violation of the OpenAI shapes, streaming or not."""

import json
import pathlib
import subprocess
import sys

CHATBENCH = pathlib.Path(__file__).resolve().parents[3] / "shared" / "tools" / "chatbench.py"


def run(chatd, *args):
    cmd = [sys.executable, str(CHATBENCH), "--url", chatd, "--model", "smollm2-135m-instruct", "--check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    summary = json.loads(proc.stdout)
    return proc.returncode, summary


def test_chatbench_check_streaming_and_not(chatd):
    code, summary = run(chatd, "--requests", "8", "--concurrency", "2", "--max-tokens", "24", "--prompt-tokens", "40")
    assert code == 0, json.dumps(summary, indent=1)
    assert summary["requests_failed"] == 0 and summary["requests_ok"] == 8
    assert summary["check"]["violations"] == [], summary["check"]


def test_chatbench_check_multi_turn(chatd):
    code, summary = run(chatd, "--turns", "3", "--concurrency", "2", "--max-tokens", "16", "--prompt-tokens", "30")
    assert code == 0, json.dumps(summary, indent=1)
    assert summary["requests_ok"] == 6
    assert summary["check"]["violations"] == [], summary["check"]
