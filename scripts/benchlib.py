"""Helpers shared by the single-server benchmarks (bench_constraints.py, bench_speculation.py)."""

import json
import os
import socket
import subprocess
import time
import urllib.request


def stream(base, body):
    """Sends a streaming request; returns (ttft, decode tok/s, completion tokens)."""
    body = dict(body, stream=True, stream_options={"include_usage": True})
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    sent = time.perf_counter()
    arrivals, usage = [], None
    with urllib.request.urlopen(request, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    tokens = usage["completion_tokens"]
    ttft = arrivals[0] - sent
    decode = (tokens - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else float("nan")
    return ttft, decode, tokens


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_chatd(chatd, model, args, log_path):
    """Starts chatd on a free port with `args` (no config file) and waits until it serves;
    returns (process, base URL)."""
    port = free_port()
    log = open(log_path, "w")
    daemon = subprocess.Popen([chatd, "--model", model, "--listen", f"127.0.0.1:{port}", "--threads", "2", *args],
                              stderr=log, env=dict(os.environ, CHATD_CONFIG="/dev/null"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if json.load(r)["status"] == "ok":
                    return daemon, base
        except OSError:
            time.sleep(0.1)
    daemon.terminate()
    raise SystemExit(f"chatd did not start; see {log_path}")
