#!/usr/bin/env python3
"""Resident memory of chatd and llama-server on one fixed workload, with default settings.

    scripts/bench-memory.sh [--skip-llama] [--model DIR] [--threads 2]

Each server is started alone, with its default settings, on the same weights (chatd: the genai
SmolLM2 folder; llama-server: the SmolLM2-135M-Instruct GGUF that scripts/build-llama-server.sh
fetches) and driven through three phases with ../shared/tools/chatbench.py and plain requests:

  1. the 8-client mix: chatbench --concurrency 8 --requests 32 --max-tokens 256;
  2. a 10-turn chat: chatbench --turns 10;
  3. 200 short requests (max_tokens 32) with n 1-4, 4 at a time. llama-server's OpenAI endpoint
     answers one choice per request, so each n-choice request is sent to it as n requests at
     once: the same tokens, the same concurrency.

Resident size (VmRSS) is sampled every 0.2 s, with VmHWM at the end as the true peak; then 5 s
of idleness and VmRSS again. For chatd, /health's memory breakdown at the peak sample is shown.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchlib import free_port

ROOT = Path(__file__).resolve().parents[1]
CHATBENCH = ROOT.parent / "shared/tools/chatbench.py"


def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Samples a process's RSS (and chatd's /health memory) until stopped."""

    def __init__(self, pid, health_url=None):
        super().__init__(daemon=True)
        self.pid, self.health_url, self.stop, self.peak, self.at_peak = pid, health_url, threading.Event(), 0, None

    def run(self):
        while not self.stop.is_set():
            rss = status_kib(self.pid, "VmRSS:")
            if rss > self.peak:
                self.peak = rss
                if self.health_url:
                    try:
                        with urllib.request.urlopen(self.health_url, timeout=5) as r:
                            self.at_peak = json.load(r)["memory"]
                    except OSError:
                        pass
            time.sleep(0.2)


def post(base, body):
    request = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.load(r)


def phases(base, model, python, splits_n):
    bench = [python, str(CHATBENCH), "--url", base, "--model", model, "--seed", "1", "--timeout", "600"]
    subprocess.run(bench + ["--concurrency", "8", "--requests", "32", "--max-tokens", "256"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(bench + ["--turns", "10", "--max-tokens", "128"], check=True, stdout=subprocess.DEVNULL)
    rng = random.Random(1)
    requests = [(i, rng.randint(1, 4)) for i in range(200)]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not requests:
                    return
                i, n = requests.pop()
            body = {"model": model, "messages": [{"role": "user", "content": f"Say something short about {i}."}],
                    "max_tokens": 32, "temperature": 0.8, "seed": i}
            if splits_n:
                threads = [threading.Thread(target=post, args=(base, dict(body, seed=i * 10 + k))) for k in range(n)]
                [t.start() for t in threads]
                [t.join() for t in threads]
            else:
                post(base, dict(body, n=n))

    workers = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in workers]
    [t.join() for t in workers]


def soak(base, model, minutes):
    """Issue 13's scenario: two clients for `minutes`, mostly short answers, some with n 2-4,
    some long (600-1,500 tokens), as an OpenAI client test suite sends them."""
    end = time.time() + minutes * 60
    counter = iter(range(10**9))
    lock = threading.Lock()

    def worker():
        while time.time() < end:
            with lock:
                i = next(counter)
            kind = i % 10
            body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about topic {i}."}],
                    "temperature": 0.8, "seed": i}
            if kind < 7:
                body["max_tokens"] = 16 + i % 48
            elif kind < 9:
                body.update(n=2 + i % 3, max_tokens=64)
            else:
                body.update(max_tokens=600 + (i * 97) % 900, ignore_eos=True)
            post(base, body)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    [t.start() for t in workers]
    [t.join() for t in workers]


def wait_ready(base, proc):
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become ready")


def measure(name, command, base, model, python, health, soak_minutes=0):
    log = open(f"/tmp/chatd-bench-memory-{name}.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=log, env=dict(os.environ, CHATD_CONFIG="/dev/null"))
    try:
        wait_ready(base, proc)
        idle_start = status_kib(proc.pid, "VmRSS:")
        sampler = Sampler(proc.pid, base + "/health" if health else None)
        sampler.start()
        started = time.time()
        if soak_minutes:
            soak(base, model, soak_minutes)
        else:
            phases(base, model, python, splits_n=not health)
        took = time.time() - started
        sampler.stop.set()
        sampler.join()
        peak = max(sampler.peak, status_kib(proc.pid, "VmHWM:"))
        time.sleep(5)
        after = status_kib(proc.pid, "VmRSS:")
        return {"name": name, "ready": idle_start, "peak": peak, "after_idle": after, "seconds": took,
                "at_peak": sampler.at_peak}
    finally:
        proc.terminate()
        proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/smollm2-135m-instruct-genai"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-server")
    p.add_argument("--gguf")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--chatd-arg", action="append", default=[])
    p.add_argument("--soak-minutes", type=float, default=0,
                   help="instead of the fixed workload: two clients of short, n > 1 and long requests for this long")
    a = p.parse_args()
    results = []
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    chatd = [str(ROOT / "target/release/chatd"), "--model", a.model, "--listen", f"127.0.0.1:{port}",
             "--threads", str(a.threads), *a.chatd_arg]
    results.append(measure("chatd", chatd, base, Path(a.model).name, a.python, health=True,
                           soak_minutes=a.soak_minutes))
    if a.llama_server:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        # Its defaults: the model's context (8,192), parallel slots chosen by llama-server.
        llama = [a.llama_server, "-m", a.gguf, "-t", str(a.threads), "--host", "127.0.0.1", "--port", str(port)]
        results.append(measure("llama-server", llama, base, "default", a.python, health=False,
                               soak_minutes=a.soak_minutes))
    mib = lambda kib: kib / 1024
    print(f"\n{'server':<14} {'ready':>8} {'peak':>8} {'after 5 s idle':>15} {'load s':>7}   (MiB)")
    for r in results:
        print(f"{r['name']:<14} {mib(r['ready']):>8.0f} {mib(r['peak']):>8.0f} {mib(r['after_idle']):>15.0f} "
              f"{r['seconds']:>7.0f}")
    m = results[0]["at_peak"]
    if m:
        print("chatd at its peak sample (MiB): " + ", ".join(
            f"{k.removesuffix('_bytes')} {v / 2**20:.0f}" for k, v in m.items() if isinstance(v, int)))
        print("chatd budgets: " + m.get("budget", "?"))


if __name__ == "__main__":
    main()
