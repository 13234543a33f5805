#!/usr/bin/env python3
"""Stress test: 64 concurrent clients of mixed behaviour against a chatd of its own, with checks.

Usage (through scripts/stress.sh, which picks the genai model and the repository venv):

    scripts/stress.sh [--requests N] [--clients C] [--seed S] [--rss-slack-mb MB]
                      [--chatd-arg=--FLAG=VALUE ...] [--model DIR] [--chatd BIN]

    scripts/stress.sh --requests 256                      # what CI runs
    scripts/stress.sh --requests 256 --rss-slack-mb 128 \\
        --chatd-arg=--kv-cache-mb=256 --chatd-arg=--prefix-cache-mb=64   # a tighter RSS bound

It starts `chatd --model DIR --listen 127.0.0.1:<free port> --threads 2 --max-queued 256
--max-queue-wait-s 120` (plus every --chatd-arg; the queue flags make 64 clients wait rather than
be refused), waits for GET /health to answer 200, then keeps C client threads (64) busy until N
chat completions (512) have been issued. Every request has the same system prompt (so the prefix
cache is hit) and one of several short user messages, max_tokens 8-48, temperature 0 or 0.7 and a
seed. A seeded RNG picks each request's client kind:

  stream       60%  reads the whole SSE stream (with stream_options.include_usage)
  non-stream   15%  reads one JSON answer
  disconnect   15%  reads the response head and 1-3 events, then resets the connection
                    (SO_LINGER 0); it asks for 32-48 tokens with ignore_eos so that the server
                    is certainly still generating when it goes, and must record 499
  slow-reader  10%  streams through a 4 KiB SO_RCVBUF, 256 bytes per read, 30-80 ms apart

Every connection has a timeout (--client-timeout-s, longer than the queue wait), so a hang is a
failure that names the request and what it was waiting for. The run fails (exit 1) on any of:

  - a lost or corrupted answer: a non-streaming answer that is not 200 with a valid
    `chat.completion` (content a string, finish_reason stop/length, usage consistent), or a
    429/503 with the OpenAI error object (counted apart as refused; none are expected with the
    queue flags above); a stream that is not 200 `text/event-stream` of valid
    `chat.completion.chunk` events with one id, exactly one finish_reason per choice, a consistent
    usage chunk and `data: [DONE]` last; a reset or timeout on a client not meant to disconnect;
  - RSS beyond what the settings account for: VmRSS is sampled every second of the load, and its
    peak may exceed what /health says the settings allow (`model_bytes`, what loading took, plus
    the KV pool's and the prefix cache's budgets) by at most --rss-slack-mb (128 MiB), the fixed
    overhead README "Sizing a box" states (threads, ONNX Runtime's working arena, requests). With
    `--chatd-arg=--kv-cache-mb=256 --chatd-arg=--prefix-cache-mb=64` the bound is tight. The RSS
    after the load and 2 s idle is reported, not checked;
  - metrics that do not account for every request: /metrics is scraped before the load and after
    it (once chatd_requests_in_flight is 0); the increase of chatd_requests_total for
    /v1/chat/completions must equal the requests issued, per status as the clients saw them (499
    for the disconnects), the completion and prompt token counters must rise by exactly what the
    answers reported, and chatd_requests_running, chatd_requests_queued and
    chatd_kv_cache_used_bytes must be 0 at the end;
  - the daemon not alive after the load, or not exiting 0 within 10 s of SIGTERM.

chatd's stderr goes to target/stress/chatd-<time>.log, which the summary names. The Python
standard library is all it needs.
"""
import argparse
import datetime
import json
import os
import random
import re
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENDPOINT = "/v1/chat/completions"

SYSTEM_PROMPT = (
    "You are a patient assistant for a small museum of maritime history. Answer visitors in plain "
    "words, in at most three sentences, and say so when you do not know something. Never invent "
    "dates, names or prices."
)
USER_MESSAGES = [
    "What is the capital of France?",
    "Write a haiku about a lighthouse.",
    "How do ships stay afloat?",
    "Name three famous explorers.",
    "What does a ship's anchor do?",
    "Tell me a short joke about sailors.",
    "Why is the sea salty?",
    "What is a knot as a unit of speed?",
    "Give me a tip for visiting a museum with children.",
    "Translate 'good morning' into Spanish.",
    "Count from one to ten.",
    "What is the opening time of the museum?",
]

KINDS = ("stream", "non-stream", "disconnect", "slow-reader")
KIND_WEIGHTS = (60, 15, 15, 10)
# The server records a request whose client went away as 499 (nginx's "client closed request").
STATUS_CLIENT_GONE = 499
REFUSAL_STATUSES = (429, 503)


class Violation(Exception):
    """The daemon broke a promise: the message says what was expected and what came."""


# ---------------------------------------------------------------- the plan

@dataclass
class Planned:
    index: int
    kind: str
    body: dict
    events_before_disconnect: int  # disconnect only
    read_delays: random.Random  # slow-reader only: its own RNG for the pauses


def plan(requests: int, seed: int) -> list[Planned]:
    """Every request drawn up front from one seeded RNG, so a seed names a whole run."""
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        body = {
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": rng.choice(USER_MESSAGES)}],
            "max_tokens": rng.randint(8, 48),
            "temperature": rng.choice((0, 0.7)),
            "seed": rng.randrange(2**31),
        }
        if kind != "non-stream":
            body["stream"] = True
        if kind in ("stream", "slow-reader"):
            body["stream_options"] = {"include_usage": True}
        if kind == "disconnect":
            body["max_tokens"] = rng.randint(32, 48)
            body["ignore_eos"] = True
        out.append(Planned(i, kind, body, rng.randint(1, 3), random.Random(rng.random())))
    return out


# ---------------------------------------------------------------- one HTTP exchange, raw

class Exchange:
    """One POST and its response over a raw socket: the client decides how fast it reads, how
    large its receive buffer is and when the connection dies, which http.client hides."""

    def __init__(self, port: int, body: dict, timeout: float, rcvbuf: int | None = None,
                 recv_size: int = 65536, read_delay=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before connect, so that the advertised window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.recv_size = recv_size
        self.read_delay = read_delay
        self.pending = b""
        self.phase = "connecting"
        self.sock.connect(("127.0.0.1", port))
        payload = json.dumps(body).encode()
        self.phase = "sending the request"
        self.sock.sendall(
            f"POST {ENDPOINT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)

    def _fill(self) -> None:
        if self.read_delay:
            time.sleep(self.read_delay())
        data = self.sock.recv(self.recv_size)
        if not data:
            raise Violation(f"the server closed the connection while the client was {self.phase}")
        self.pending += data

    def _take_until(self, separator: bytes) -> bytes:
        while (at := self.pending.find(separator)) < 0:
            self._fill()
        taken, self.pending = self.pending[:at], self.pending[at + len(separator):]
        return taken

    def _take(self, n: int) -> bytes:
        while len(self.pending) < n:
            self._fill()
        taken, self.pending = self.pending[:n], self.pending[n:]
        return taken

    def read_head(self) -> tuple[int, dict]:
        self.phase = "waiting for the response head"
        lines = self._take_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise Violation(f"bad status line {lines[0]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise Violation(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def body(self, headers: dict):
        """Yields the body's bytes as they come: chunked, Content-Length or up to the close."""
        self.phase = "reading the body"
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self._take_until(b"\r\n").split(b";")[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError:
                    raise Violation(f"bad chunk size line {size_line!r}") from None
                if size == 0:
                    while self._take_until(b"\r\n"):  # trailers, up to the empty line
                        pass
                    return
                yield self._take(size)
                if self._take(2) != b"\r\n":
                    raise Violation("a chunk did not end with CRLF")
        elif "content-length" in headers:
            yield self._take(int(headers["content-length"]))
        else:
            while True:
                yield self.pending
                self.pending = b""
                data = self.sock.recv(self.recv_size)
                if not data:
                    return
                self.pending = data

    def reset(self) -> None:
        """Closes with a TCP reset (SO_LINGER 0): the most abrupt way a client can vanish."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- answer checks

def is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_usage(usage, max_tokens: int, where: str) -> dict:
    if not isinstance(usage, dict):
        raise Violation(f"{where}: usage is {usage!r}, not an object")
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    if not (is_count(p) and is_count(c) and is_count(t)) or p + c != t or p == 0:
        raise Violation(f"{where}: inconsistent usage {usage}")
    if c > max_tokens:
        raise Violation(f"{where}: {c} completion tokens for max_tokens {max_tokens}")
    return usage


def check_refusal(status: int, headers: dict, body: bytes) -> None:
    """A 429 or 503 must carry the OpenAI error object (and a 429 a Retry-After)."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise Violation(f"{status} without an OpenAI error object: {body[:300]!r}") from None
    if not (isinstance(error, dict) and isinstance(error.get("message"), str)
            and {"message", "type", "param", "code"} <= error.keys()):
        raise Violation(f"{status} with a malformed error object: {error!r}")
    if status == 429 and "retry-after" not in headers:
        raise Violation("429 without Retry-After")


def check_completion(body: bytes, max_tokens: int) -> dict:
    """A whole non-streaming answer; returns its usage."""
    try:
        answer = json.loads(body)
    except ValueError:
        raise Violation(f"the answer is not JSON: {body[:300]!r}") from None
    if not isinstance(answer, dict) or answer.get("object") != "chat.completion" or not answer.get("id"):
        raise Violation(f"not a chat.completion: {body[:300]!r}")
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Violation(f"no choices: {body[:300]!r}")
    message = choices[0].get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise Violation(f"choices[0].message.content is not a string: {message!r}")
    finish = choices[0].get("finish_reason")
    if finish not in ("stop", "length"):
        raise Violation(f"finish_reason {finish!r}")
    usage = check_usage(answer.get("usage"), max_tokens, "chat.completion")
    if finish == "length" and usage["completion_tokens"] != max_tokens:
        raise Violation(f"finish_reason length after {usage['completion_tokens']} of {max_tokens} tokens")
    return usage


class StreamChecker:
    """Checks a stream's `data:` payloads one by one, as they arrive."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.id = None
        self.events = 0
        self.finishes = Counter()
        self.content = {}
        self.usage = None
        self.done = False

    def add(self, data: str) -> None:
        if self.done:
            raise Violation(f"an event after data: [DONE]: {data[:200]!r}")
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise Violation(f"event {self.events + 1} is not JSON: {data[:200]!r}") from None
        self.events += 1
        if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk":
            raise Violation(f"event {self.events} is not a chat.completion.chunk: {data[:200]!r}")
        if self.id is None:
            self.id = chunk.get("id")
        if not self.id or chunk.get("id") != self.id:
            raise Violation(f"event {self.events} has id {chunk.get('id')!r}, the stream {self.id!r}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise Violation(f"event {self.events}: choices is {choices!r}")
        if chunk.get("usage") is not None:
            if choices or self.usage is not None:
                raise Violation(f"event {self.events}: a second usage, or usage beside choices")
            self.usage = check_usage(chunk["usage"], self.max_tokens, "usage chunk")
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("delta"), dict):
                raise Violation(f"event {self.events}: malformed choice {choice!r}")
            index, text = choice.get("index"), choice["delta"].get("content")
            if not is_count(index):
                raise Violation(f"event {self.events}: choice index {index!r}")
            if text is not None and not isinstance(text, str):
                raise Violation(f"event {self.events}: delta.content is {text!r}")
            if self.finishes[index]:
                raise Violation(f"event {self.events}: choice {index} goes on after its finish_reason")
            self.content[index] = self.content.get(index, "") + (text or "")
            finish = choice.get("finish_reason")
            if finish is not None:
                if finish not in ("stop", "length"):
                    raise Violation(f"event {self.events}: finish_reason {finish!r}")
                self.finishes[index] += 1

    def finish(self, want_usage: bool) -> None:
        if not self.done:
            raise Violation(f"the stream ended after {self.events} events without data: [DONE]")
        if not self.content or any(self.finishes[i] != 1 for i in self.content):
            raise Violation(f"finish_reasons per choice {dict(self.finishes)} over choices {sorted(self.content)}")
        if want_usage and self.usage is None:
            raise Violation("stream_options.include_usage asked for usage and none came")


def sse_payloads(pieces):
    """The `data:` payloads of an SSE body given as byte pieces, as soon as each event is whole."""
    buffer = b""
    for piece in pieces:
        buffer += piece
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2:]
            for line in event.decode("utf-8").split("\n"):
                if line.startswith("data:"):
                    yield line[5:].strip()
    if buffer.strip():
        raise Violation(f"the stream ended inside an event: {buffer[:200]!r}")


# ---------------------------------------------------------------- clients

@dataclass
class Result:
    planned: Planned
    outcome: str = "violation"  # ok | refused | violation | script-error
    seen_status: int | None = None  # the status line the client read
    server_status: int | None = None  # what chatd should record: 499 for a planned disconnect
    detail: str = ""
    usage: dict | None = None
    ttft: float | None = None


def run_request(p: Planned, port: int, timeout: float) -> Result:
    result = Result(p)
    slow = p.kind == "slow-reader"
    exchange = None
    try:
        started = time.monotonic()
        exchange = Exchange(port, p.body, timeout, rcvbuf=4096 if slow else None,
                            recv_size=256 if slow else 65536,
                            read_delay=(lambda: p.read_delays.uniform(0.03, 0.08)) if slow else None)
        status, headers = exchange.read_head()
        result.seen_status = result.server_status = status
        if status != 200:
            check_refusal(status, headers, b"".join(exchange.body(headers)))
            result.outcome = "refused"
            return result
        if p.kind == "non-stream":
            if not headers.get("content-type", "").startswith("application/json"):
                raise Violation(f"Content-Type {headers.get('content-type')!r}")
            result.usage = check_completion(b"".join(exchange.body(headers)), p.body["max_tokens"])
            result.outcome = "ok"
            return result
        if not headers.get("content-type", "").startswith("text/event-stream"):
            raise Violation(f"Content-Type {headers.get('content-type')!r}")
        checker = StreamChecker(p.body["max_tokens"])
        for data in sse_payloads(exchange.body(headers)):
            if result.ttft is None:
                result.ttft = time.monotonic() - started
            checker.add(data)
            exchange.phase = f"reading the stream after {checker.events} events"
            if p.kind == "disconnect" and checker.events == p.events_before_disconnect:
                exchange.reset()
                result.server_status = STATUS_CLIENT_GONE
                result.outcome = "ok"
                return result
        if p.kind == "disconnect":
            raise Violation(f"the stream ended after {checker.events} events, before the client meant to "
                            f"disconnect (after {p.events_before_disconnect}) with max_tokens "
                            f"{p.body['max_tokens']} and ignore_eos")
        checker.finish(want_usage="stream_options" in p.body)
        result.usage = checker.usage
        result.outcome = "ok"
    except Violation as e:
        result.detail = str(e)
    except socket.timeout:
        result.detail = f"no data for {timeout:.0f} s while {exchange.phase if exchange else 'connecting'}"
    except (OSError, UnicodeDecodeError) as e:
        result.detail = f"{type(e).__name__} ({e}) while {exchange.phase if exchange else 'connecting'}"
    except Exception:  # a bug in this script, not in chatd: reported as such
        result.outcome = "script-error"
        result.detail = traceback.format_exc()
    finally:
        if exchange:
            exchange.close()
    return result


# ---------------------------------------------------------------- the daemon

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict:
    """Prometheus text format -> {(name, ((label, value), ...)): value}."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if not m:
            raise Violation(f"/metrics: unparsable line {line!r}")
        labels = tuple(sorted(LABEL.findall(m.group(2) or "")))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def requests_by_status(samples: dict) -> Counter:
    out = Counter()
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == "chatd_requests_total" and labels.get("endpoint") == ENDPOINT:
            out[int(labels["status"])] += int(value)
    return out


def unlabelled(samples: dict, name: str) -> float:
    """The value of a metric without labels (0 when absent)."""
    return samples.get((name, ()), 0.0)


class Chatd:
    def __init__(self, binary: str, model: str, extra_args: list[str], log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        self.cmd = [binary, "--model", model, "--listen", f"127.0.0.1:{self.port}", "--threads", "2",
                    "--max-queued", "256", "--max-queue-wait-s", "120", *extra_args]
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.fail(f"chatd exited with status {self.proc.returncode} during startup")
            try:
                if http_get(self.port, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail("chatd did not answer GET /health with 200 within 120 s")
            time.sleep(0.1)

    def fail(self, why: str):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"stress: {why}\ncommand: {shlex.join(self.cmd)}\n"
                 f"--- chatd stderr (tail; all of it in {self.log_path}) ---\n{tail}")

    def metrics(self) -> dict:
        status, body = http_get(self.port, "/metrics")
        if status != 200:
            raise Violation(f"GET /metrics answered {status}")
        return parse_metrics(body.decode())

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, then up to 10 s for the exit: (exit status or None if killed, seconds taken)."""
        sent = time.monotonic()
        if self.proc.poll() is not None:
            return self.proc.returncode, 0.0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10), time.monotonic() - sent
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None, time.monotonic() - sent

    def accounted_bound_mb(self) -> float | None:
        """What /health says the settings allow: the model as loaded plus the KV pool's and the
        prefix cache's budgets, in MiB."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as r:
                memory = json.load(r)["memory"]
        except (OSError, ValueError, KeyError):
            return None
        total = memory["model_bytes"] + memory["kv_cache_budget_bytes"] + memory["prefix_cache_budget_bytes"]
        return total / 2**20

    def rss_mb(self, field_name: str = "VmRSS") -> float | None:
        """In MiB, from /proc/<pid>/status; None once the process is gone."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


# ---------------------------------------------------------------- the run

@dataclass
class Load:
    """The shared state of the client threads."""
    planned: list
    warmup: int
    next_index: int = 0
    results: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    warm: threading.Event = field(default_factory=threading.Event)

    def client(self, port: int, timeout: float) -> None:
        while True:
            with self.lock:
                if self.next_index == len(self.planned):
                    return
                p = self.planned[self.next_index]
                self.next_index += 1
            result = run_request(p, port, timeout)
            with self.lock:
                self.results.append(result)
                if len(self.results) == self.warmup:
                    self.warm.set()


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (scripts/stress.sh gives the genai one)")
    ap.add_argument("--chatd", default=str(ROOT / "target" / "release" / "chatd"), help="chatd binary")
    ap.add_argument("--requests", type=int, default=512, help="chat completions to issue in all [512]")
    ap.add_argument("--clients", type=int, default=64, help="concurrent client threads [64]")
    ap.add_argument("--seed", type=int, default=1, help="seed of the request plan [1]")
    ap.add_argument("--warmup", type=int, default=64, help="finished requests before the RSS baseline [64]")
    ap.add_argument("--rss-slack-mb", type=float, default=128,
                    help="allowed RSS over the model and the memory budgets /health reports, MiB [128]")
    ap.add_argument("--client-timeout-s", type=float, default=150,
                    help="longest a client waits for any byte; beyond the 120 s queue wait [150]")
    ap.add_argument("--chatd-arg", action="append", default=[], metavar="ARG",
                    help="extra chatd argument, repeatable; write it as --chatd-arg=--kv-cache-mb=256")
    args = ap.parse_args()
    if args.requests <= args.warmup or args.clients < 1:
        sys.exit("stress: --requests must exceed --warmup, and --clients be at least 1")
    if not os.access(args.chatd, os.X_OK):
        sys.exit(f"stress: no chatd binary at {args.chatd} (cargo build --release --locked)")

    run_started = time.monotonic()
    out_dir = ROOT / "target" / "stress"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"chatd-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    chatd = Chatd(args.chatd, args.model, args.chatd_arg, log_path)
    print(f"chatd stress: {args.requests} requests, {args.clients} clients, seed {args.seed}", flush=True)
    print(f"daemon: {shlex.join(chatd.cmd)}\ndaemon log: {log_path}", flush=True)
    violations = []  # (what, detail)
    try:
        before = chatd.metrics()
        rss_idle = chatd.rss_mb()
        bound_mb = chatd.accounted_bound_mb()
        load = Load(plan(args.requests, args.seed), args.warmup)
        threads = [threading.Thread(target=load.client, args=(chatd.port, args.client_timeout_s), daemon=True)
                   for _ in range(args.clients)]
        load_started = time.monotonic()
        for t in threads:
            t.start()
        load.warm.wait()
        rss_warm = chatd.rss_mb()
        rss_samples = [rss_warm]
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            rss_samples.append(chatd.rss_mb())
        wall = time.monotonic() - load_started

        alive = chatd.proc.poll() is None
        if not alive:
            violations.append(("daemon", f"chatd exited with status {chatd.proc.returncode} during the load"))
            after, rss_final, hwm = before, None, None
        else:
            # Every client is done, but chatd may still be noticing the last disconnects; and it
            # lowers chatd_requests_in_flight just before it counts a request, so wait for both.
            deadline = time.monotonic() + 30
            while True:
                after = chatd.metrics()
                counted = sum((requests_by_status(after) - requests_by_status(before)).values())
                idle = unlabelled(after, "chatd_requests_in_flight") == 0
                if (idle and counted >= args.requests) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if not idle:
                violations.append(("metrics", f"chatd_requests_in_flight still "
                                   f"{unlabelled(after, 'chatd_requests_in_flight'):.0f} 30 s after the load"))
            time.sleep(2)
            rss_final, hwm = chatd.rss_mb(), chatd.rss_mb("VmHWM")
    finally:
        exit_status, term_took = chatd.stop()

    if exit_status != 0:
        violations.append(("shutdown", "chatd did not exit within 10 s of SIGTERM" if exit_status is None
                           else f"chatd exited with status {exit_status} after SIGTERM"))

    # ---- per-request outcomes
    results = sorted(load.results, key=lambda r: r.planned.index)
    script_errors = [r for r in results if r.outcome == "script-error"]
    for r in results:
        if r.outcome == "violation":
            violations.append((f"request {r.planned.index} ({r.planned.kind})", r.detail))

    print(f"\n{'kind':<12}{'issued':>8}{'ok':>8}{'refused':>9}{'violations':>12}")
    for kind in KINDS + ("total",):
        rs = [r for r in results if kind in (r.planned.kind, "total")]
        count = Counter(r.outcome for r in rs)
        print(f"{kind:<12}{len(rs):>8}{count['ok']:>8}{count['refused']:>9}{count['violation']:>12}")

    refused = sum(1 for r in results if r.outcome == "refused")
    if refused:
        print(f"note: {refused} request(s) refused with 429/503; none are expected with --max-queued 256 "
              f"--max-queue-wait-s 120 unless --chatd-arg overrides them")

    # ---- metrics reconciliation
    clients_by_status = Counter(r.server_status for r in results if r.server_status is not None)
    unknown = sum(1 for r in results if r.server_status is None)
    recorded = requests_by_status(after) - requests_by_status(before)
    print(f"\n{'status':<8}{'clients':>9}{'chatd':>8}   (chatd: increase of chatd_requests_total"
          f"{{endpoint=\"{ENDPOINT}\"}})")
    for status in sorted(set(clients_by_status) | set(recorded)):
        print(f"{status:<8}{clients_by_status[status]:>9}{recorded[status]:>8}")
    if unknown:
        print(f"{'none':<8}{unknown:>9}{'':>8}   (no status line read)")
    total_recorded = sum(recorded.values())
    print(f"{'total':<8}{len(results):>9}{total_recorded:>8}")
    if total_recorded != args.requests:
        violations.append(("metrics", f"chatd counted {total_recorded} chat completions; {args.requests} were issued"))
    for status in sorted(set(clients_by_status) | set(recorded)):
        if clients_by_status[status] != recorded[status] and not unknown:
            violations.append(("metrics", f"status {status}: clients saw {clients_by_status[status]}, "
                               f"chatd counted {recorded[status]}"))

    answered = [r.usage for r in results if r.usage]
    completion_tokens = sum(u["completion_tokens"] for u in answered)
    prompt_tokens = sum(u["prompt_tokens"] for u in answered)
    cached_tokens = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in answered)
    for name, seen in (("chatd_completion_tokens_total", completion_tokens), ("chatd_prompt_tokens_total", prompt_tokens)):
        delta = unlabelled(after, name) - unlabelled(before, name)
        print(f"{name}: +{delta:.0f}; answers reported {seen}")
        if delta != seen:
            violations.append(("metrics", f"{name} rose by {delta:.0f}, the answers reported {seen}"))
    end_gauges = {name: unlabelled(after, name) for name in
                  ("chatd_requests_running", "chatd_requests_queued", "chatd_requests_in_flight",
                   "chatd_kv_cache_used_bytes")}
    print("at the end: " + ", ".join(f"{k} {v:.0f}" for k, v in end_gauges.items())
          + f"; chatd_kv_cache_bytes {unlabelled(after, 'chatd_kv_cache_bytes'):.0f}"
          + f", chatd_prefix_cache_bytes {unlabelled(after, 'chatd_prefix_cache_bytes') / 2**20:.1f} MiB")
    for name, value in end_gauges.items():
        if value != 0:
            violations.append(("metrics", f"{name} is {value:.0f} after the load, not 0"))

    # ---- throughput, latency, memory
    ttfts = [r.ttft for r in results if r.ttft is not None]
    print(f"\ncompletion tokens: {completion_tokens} in {len(answered)} answers "
          f"(prompt {prompt_tokens}, of them cached {cached_tokens}); "
          f"load wall time {wall:.1f} s, {completion_tokens / wall:.1f} tok/s aggregate")
    if ttfts:
        print(f"TTFT, all streaming kinds (n={len(ttfts)}): p50 {percentile(ttfts, 50) * 1e3:.0f} ms, "
              f"p95 {percentile(ttfts, 95) * 1e3:.0f} ms, max {max(ttfts) * 1e3:.0f} ms")
    known = [s for s in rss_samples if s is not None]
    if rss_warm is not None and known:
        # VmHWM is the true peak, between samples and before the warm-up too.
        peak = max(max(known), hwm or 0)
        print(f"RSS (MiB): idle before the load {rss_idle:.0f}, warm-up {rss_warm:.0f} (after {args.warmup} "
              f"requests), peak {peak:.0f} ({len(known)} samples; allowed {bound_mb or float('nan'):.0f} accounted "
              f"+ {args.rss_slack_mb:.0f}), final {rss_final or float('nan'):.0f} after 2 s idle, "
              f"VmHWM {hwm or float('nan'):.0f}")
        if bound_mb is not None and peak > bound_mb + args.rss_slack_mb:
            violations.append(("rss", f"peak RSS {peak:.0f} MiB exceeds the accounted {bound_mb:.0f} MiB "
                               f"(model + KV and prefix cache budgets) + {args.rss_slack_mb:.0f} MiB"))
    if alive:
        shown = "no exit within 10 s" if exit_status is None else f"exit status {exit_status}"
        print(f"daemon: alive after the load; SIGTERM -> {shown} in {term_took:.2f} s")
    print(f"total run time {time.monotonic() - run_started:.1f} s; daemon log {log_path}")

    if script_errors:
        print(f"\nstress.py itself failed on {len(script_errors)} request(s); first traceback:\n"
              f"{script_errors[0].detail}", file=sys.stderr)
        sys.exit(2)
    if violations:
        print(f"\nFAIL: {len(violations)} violation(s)")
        by_what = Counter(re.sub(r"\d+", "N", detail) for _, detail in violations)
        for (what, detail) in violations[:20]:
            print(f"  {what}: {detail}")
        if len(violations) > 20:
            print(f"  ... and {len(violations) - 20} more; by kind:")
            for detail, n in by_what.most_common():
                print(f"  {n} x {detail}")
        sys.exit(1)
    print("\nPASS")


if __name__ == "__main__":
    main()
