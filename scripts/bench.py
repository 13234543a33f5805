#!/usr/bin/env python3
"""Single-stream benchmark: chatd against a plain onnxruntime Python loop on the same model.

Both sides get the same prompt token ids and generate the same number of tokens greedily
(ignore_eos), and runs alternate (loop, chatd, loop, chatd, ...) after one uncounted warm-up
each, so that drift of a shared machine hits both alike. Each metric is the median over repeats.

Run it through scripts/bench.sh, which uses the repository venv (.venv: onnxruntime, numpy,
tokenizers) and builds target/release/chatd if it is missing.
"""
import argparse
import datetime
import http.client
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"

# A fixed paragraph of 107 tokens (the SmolLM2 tokenizer, no special tokens).
PROMPT = (
    "The old lighthouse stood at the edge of the cliff for more than a century, guiding fishing "
    "boats home through fog and storms. Every evening the keeper climbed the narrow spiral stairs, "
    "trimmed the wick, and polished the great glass lens until it shone. Sailors said they could "
    "see its beam from twenty miles away. When the town finally installed an electric light, the "
    "keeper stayed on anyway, because he could not imagine a night without climbing those stairs. "
    "One cold winter evening, a young girl in a red coat knocked on his door and asked"
)


# ---------------------------------------------------------------- baseline (worker subprocess)

def worker(model_dir: str, prompt: list[int], new_tokens: int) -> None:
    """The plain onnxruntime loop. Runs in its own process so that ru_maxrss is its own; the
    parent writes one line per run on stdin and gets one JSON line back on stdout."""
    import resource

    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    sess = ort.InferenceSession(str(Path(model_dir) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    out_names = [o.name for o in sess.get_outputs()]
    # present.{i}.key -> past_key_values.{i}.key, by output position.
    feed_back = [(k, "past_key_values." + n[len("present."):]) for k, n in enumerate(out_names)
                 if n.startswith("present.")]
    logits_at = out_names.index("logits")

    def run_once() -> dict:
        ids = np.array([prompt], dtype=np.int64)
        feeds = {name: np.zeros((1, 3, 0, 64), dtype=np.float32) for name in past_names}
        feeds["input_ids"] = ids
        feeds["attention_mask"] = np.ones_like(ids)
        feeds["position_ids"] = np.arange(len(prompt), dtype=np.int64)[None, :]
        t0 = time.perf_counter()
        outs = sess.run(None, feeds)
        t1 = time.perf_counter()
        token = int(np.argmax(outs[logits_at][0, -1]))
        t2 = time.perf_counter()
        tokens, in_run, past = [token], 0.0, len(prompt)
        # Decode: N-1 more steps; the whole step (feeds, run, argmax) is timed, session.run alone too.
        for _ in range(new_tokens - 1):
            feeds = {name: outs[k] for k, name in feed_back}
            feeds["input_ids"] = np.array([[token]], dtype=np.int64)
            feeds["attention_mask"] = np.ones((1, past + 1), dtype=np.int64)
            feeds["position_ids"] = np.array([[past]], dtype=np.int64)
            r0 = time.perf_counter()
            outs = sess.run(None, feeds)
            in_run += time.perf_counter() - r0
            token = int(np.argmax(outs[logits_at][0, -1]))
            tokens.append(token)
            past += 1
        t3 = time.perf_counter()
        steps = max(new_tokens - 1, 1)
        return {
            "prefill_tok_s": len(prompt) / (t1 - t0),
            "ttft_ms": (t2 - t0) * 1e3,
            "decode_tok_s": (new_tokens - 1) / (t3 - t2) if new_tokens > 1 else float("nan"),
            "step_run_ms": in_run / steps * 1e3,
            "step_other_ms": ((t3 - t2) - in_run) / steps * 1e3,
            "tokens": tokens,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        }

    print(json.dumps({"ready": True, "onnxruntime": ort.__version__}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(run_once()), flush=True)


class Baseline:
    def __init__(self, model_dir: str, prompt: list[int], new_tokens: int):
        cmd = [sys.executable, __file__, "--_worker", "--model", model_dir,
               "--new-tokens", str(new_tokens), "--_ids", ",".join(map(str, prompt))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"bench: the onnxruntime loop worker exited (status {self.proc.wait()})")
        return json.loads(line)

    def run(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- chatd (server subprocess)

LOG_RE = re.compile(r"POST /v1/completions 200 .*?prompt=(\d+) completion=(\d+) cached=(\d+) "
                    r"queue=([\d.]+)ms ttft=([\d.]+)ms model=([\d.]+)ms sample=([\d.]+)ms detok=([\d.]+)ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Chatd:
    def __init__(self, binary: str, model_dir: str, log_path: Path):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.cmd = [binary, "--model", model_dir, "--listen", f"127.0.0.1:{self.port}", "--threads", "2"]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                self.fail(f"chatd exited with status {self.proc.returncode} during startup")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.fail("chatd did not answer GET /health with 200 within 120 s")
            time.sleep(0.1)

    def fail(self, why: str):
        self.close()
        sys.exit(f"bench: {why}\ncommand: {shlex.join(self.cmd)}\n--- chatd stderr (tail; all of it in {self.log_path}) ---\n{tail(self.log_path)}")

    def logged_requests(self) -> list[tuple]:
        return [m.groups() for m in LOG_RE.finditer(self.log_path.read_text(errors="replace"))]

    def run(self, prompt: list[int], new_tokens: int) -> dict:
        body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}})
        logged_before = len(self.logged_requests())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.connect()  # TCP setup is not part of TTFT
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            self.fail(f"POST /v1/completions answered {resp.status}: {resp.read()[:500]!r}")
        t_first = t_last = None
        text, usage = [], None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    t_first = t_first or now
                    t_last = now
                    text.append(choice["text"])
        t_end = time.perf_counter()
        conn.close()
        if usage is None or t_first is None:
            self.fail("the stream carried no text or no usage chunk")
        # chatd logs the request line once the stream is done; wait a moment for it.
        deadline = time.monotonic() + 5
        while len(logs := self.logged_requests()) <= logged_before:
            if time.monotonic() > deadline:
                self.fail("no request line with timings in chatd's stderr")
            time.sleep(0.02)
        _, completion, cached, queue, s_ttft, model, sample, detok = map(float, logs[logged_before])
        n = usage["completion_tokens"]
        steps = max(n - 1, 1)
        # Per decode step, to match the loop's split. chatd's model time also holds the prefill
        # run; its server-side TTFT minus queueing is that run plus one sampling, close enough.
        decode_model = max(model - (s_ttft - queue), 0.0)
        client_step = (t_last - t_first) / steps * 1e3
        split = {"model_ms": decode_model / steps, "sample_ms": sample / n, "detok_ms": detok / n}
        split["http_other_ms"] = client_step - sum(split.values())
        return {
            "prefill_tok_s": usage["prompt_tokens"] / (t_first - t0),
            "ttft_ms": (t_first - t0) * 1e3,
            "decode_tok_s": (n - 1) / (t_last - t_first) if n > 1 else float("nan"),
            "total_ms": (t_end - t0) * 1e3,
            "prompt_tokens": usage["prompt_tokens"], "completion_tokens": n, "cached_tokens": int(cached),
            "text": "".join(text), **{"step_" + k: v for k, v in split.items()},
        }

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
        return float("nan")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- driver

def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (Optimum layout)")
    ap.add_argument("--chatd", default=str(ROOT / "target" / "release" / "chatd"), help="chatd binary")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per run [64]")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per side; medians are reported [3]")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        return worker(args.model, [int(t) for t in args._ids.split(",")], args.new_tokens)
    if args.new_tokens < 2 or args.repeats < 1:
        sys.exit("bench: --new-tokens must be at least 2 and --repeats at least 1")
    if not os.access(args.chatd, os.X_OK):
        sys.exit(f"bench: no chatd binary at {args.chatd} (cargo build --release)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("bench: needs the `tokenizers` package: .venv/bin/python -m pip install tokenizers")
    tokenizer = Tokenizer.from_file(str(Path(args.model) / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False).ids

    started = datetime.datetime.now().astimezone()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"chatd-bench-{os.getpid()}.log"
    loop_runs, chatd_runs = [], []
    baseline = chatd = None
    try:
        baseline = Baseline(args.model, prompt, args.new_tokens)
        chatd = Chatd(args.chatd, args.model, log_path)
        for i in range(args.repeats + 1):  # run 0 is the uncounted warm-up
            b, c = baseline.run(), chatd.run(prompt, args.new_tokens)
            tag = "warm-up" if i == 0 else f"run {i}/{args.repeats}"
            print(f"{tag}: loop decode {b['decode_tok_s']:.1f} tok/s, chatd decode {c['decode_tok_s']:.1f} tok/s",
                  file=sys.stderr)
            if i:
                loop_runs.append(b)
                chatd_runs.append(c)
        chatd_rss = chatd.peak_rss_mb()
    finally:
        if chatd:
            chatd.close()
        if baseline:
            baseline.close()
    loop_rss = max(r["rss_mb"] for r in loop_runs)
    loop_text = tokenizer.decode(loop_runs[-1]["tokens"], skip_special_tokens=False)
    same_text = loop_text == chatd_runs[-1]["text"]
    log_path.unlink(missing_ok=True)

    L = {k: median(loop_runs, k) for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "step_run_ms", "step_other_ms")}
    C = {k: median(chatd_runs, k) for k in ("prefill_tok_s", "decode_tok_s", "ttft_ms", "step_model_ms",
                                             "step_sample_ms", "step_detok_ms", "step_http_other_ms")}
    print(f"chatd benchmark, {started:%Y-%m-%d %H:%M:%S %Z}")
    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print(f"model: {args.model}; prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy; "
          f"median of {args.repeats} run(s) after 1 warm-up; onnxruntime {baseline.info['onnxruntime']} (loop); "
          f"{os.cpu_count()} CPUs")
    rows = [
        ("prefill tok/s", C["prefill_tok_s"], L["prefill_tok_s"], C["prefill_tok_s"] / L["prefill_tok_s"],
         "chatd/loop, >1 = chatd faster"),
        ("decode tok/s", C["decode_tok_s"], L["decode_tok_s"], C["decode_tok_s"] / L["decode_tok_s"],
         "chatd/loop, >1 = chatd faster"),
        ("TTFT ms", C["ttft_ms"], L["ttft_ms"], L["ttft_ms"] / C["ttft_ms"], "loop/chatd, >1 = chatd faster"),
        ("peak RSS MB", chatd_rss, loop_rss, chatd_rss / loop_rss, "chatd/loop, <1 = chatd smaller"),
    ]
    print(f"\n{'metric':<15}{'chatd':>10}{'ort loop':>10}{'ratio':>8}  direction")
    for name, c, l, r, d in rows:
        print(f"{name:<15}{c:>10.1f}{l:>10.1f}{r:>8.2f}  {d}")
    print("\nper decode step (ms, medians):")
    print(f"  ort loop: session.run {L['step_run_ms']:.2f} + outside run {L['step_other_ms']:.2f}"
          f" = {L['step_run_ms'] + L['step_other_ms']:.2f}")
    print(f"  chatd:    model {C['step_model_ms']:.2f} + sample {C['step_sample_ms']:.2f}"
          f" + detok {C['step_detok_ms']:.2f} + HTTP/other {C['step_http_other_ms']:.2f}"
          f" = {C['step_model_ms'] + C['step_sample_ms'] + C['step_detok_ms'] + C['step_http_other_ms']:.2f}")
    print(f"\nsame greedy text from both: {'yes' if same_text else 'no (4-bit numerics may differ)'}")
    if any(r["cached_tokens"] for r in chatd_runs):
        print("warning: chatd reused cached prompt tokens, so its prefill figures are not cold", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "date": started.isoformat(), "command": [sys.executable] + sys.argv, "model": args.model,
            "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "repeats": args.repeats,
            "chatd": {**C, "peak_rss_mb": chatd_rss}, "loop": {**L, "peak_rss_mb": loop_rss},
            "same_text": same_text,
            "runs": {"chatd": [{k: v for k, v in r.items() if k != "text"} for r in chatd_runs],
                     "loop": [{k: v for k, v in r.items() if k != "tokens"} for r in loop_runs]},
        }, indent=2))


if __name__ == "__main__":
    main()
