#!/usr/bin/env python3
"""Benchmark chatd against onnxruntime-genai (scripts/oga_server.py) and llama.cpp's llama-server.

Driven by scripts/bench-peers.sh, which prepares the binaries and passes their paths. Every
measurement goes through ../shared/tools/chatbench.py with the same prompts (temperature 0,
--max-tokens 128, --prompt-tokens 200, streaming, --warmup 2). Servers run one at a time, back to
back, each on a free port; each is stopped (and its peak RSS, VmHWM, read) before the next starts.

Runs per server (the "phases"):
  single   --concurrency 1 --requests 6              decode tok/s, TTFT
  turns1   --turns 10 --concurrency 1                TTFT(turn 10)/TTFT(turn 1), cached tokens
  turns2   --turns 10 --concurrency 2                (not with --quick)
  c4       --concurrency 4 --requests 16             aggregate completion tok/s, failures
  c8       --concurrency 8 --requests 24             aggregate completion tok/s, failures
plus chatd with --speculative-tokens N (prompt-lookup speculation; single only), chatd with
--stream-slowdown X (prompts may slow running streams more: throughput over inter-token latency;
c8 only), chatd on the Optimum folder (single only, for reference) and a chatd overload run
(--max-queued 16 --max-running 8; --concurrency 64 --requests 128 --max-tokens 32): 429s, other
failures, and whether anything hung.

llama-server gets parallel slots matching the concurrency of each phase (-np 1 for single/turns1,
-np 2 for turns2, -np 8 for c4/c8; -c 8192 is split between the slots), so it is restarted
between phases with different -np; its peak RSS is the largest over its instances.

Results: OUT/report.md (the table, also printed), OUT/results.json, OUT/<server>-<phase>.json
(chatbench summaries), OUT/<server>*.log (server logs).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name, chatbench arguments, llama-server slots, in --quick
# Each phase has its own --seed, hence its own prompts (the same for every server): a server's
# prefix cache cannot carry a phase's prompts over into the next phase.
PHASES_FULL = [
    ("single", ["--concurrency", "1", "--requests", "6", "--seed", "101"], 1),
    ("turns1", ["--turns", "10", "--concurrency", "1", "--seed", "102"], 1),
    ("turns2", ["--turns", "10", "--concurrency", "2", "--seed", "103"], 2),
    ("c4", ["--concurrency", "4", "--requests", "16", "--seed", "104"], 8),
    ("c8", ["--concurrency", "8", "--requests", "24", "--seed", "105"], 8),
]
PHASES_QUICK = [
    ("single", ["--concurrency", "1", "--requests", "2", "--seed", "101"], 1),
    ("turns1", ["--turns", "3", "--concurrency", "1", "--seed", "102"], 1),
    ("c4", ["--concurrency", "4", "--requests", "4", "--seed", "104"], 8),
    ("c8", ["--concurrency", "8", "--requests", "8", "--seed", "105"], 8),
]
COMMON = ["--temperature", "0", "--max-tokens", "128", "--prompt-tokens", "200", "--stream"]


def with_common(extra):
    """COMMON, less the options that `extra` sets itself, then `extra`."""
    out, i = [], 0
    while i < len(COMMON):
        opt = COMMON[i]
        takes_value = i + 1 < len(COMMON) and not COMMON[i + 1].startswith("--")
        if opt not in extra:
            out += COMMON[i:i + 1 + takes_value]
        i += 1 + takes_value
    return out + list(extra)

# Targets (chatd's): the script reports each as met / NOT met.
T_SINGLE_OVER_PEERS = 1.1
T_C8_OVER_LLAMA = 3.0
T_C8_OVER_OWN_SINGLE = 2.5
T_TURNS_TTFT_RATIO = 0.8
T_TURNS_WALL_OVER_LLAMA = 0.8  # a whole 10-turn chat, as its user waits for it

_running = []  # Server objects to stop on exit


def log(msg):
    print(f"[bench-peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ValueError):
        return None, b""


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def tail(path, n=40):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


class ServerError(Exception):
    pass


class Server:
    """One server process: started on a free port, ready when GET /health answers 200."""

    def __init__(self, label, argv_for_port, log_path, ready_timeout):
        self.label, self.argv_for_port, self.log_path = label, argv_for_port, log_path
        self.ready_timeout = ready_timeout
        self.proc = None
        self.port = None
        self.model = None
        self.peak_rss_kib = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.port = free_port()
        argv = self.argv_for_port(self.port)
        log(f"starting {self.label}: {shlex.join(argv)}")
        logf = open(self.log_path, "ab")
        logf.write(f"\n===== {datetime.datetime.now().isoformat()} {shlex.join(argv)}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=ROOT, start_new_session=True)
        logf.close()
        _running.append(self)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.label} exited with status {self.proc.returncode} before it was ready")
            status, _ = http_get(self.url + "/health")
            if status == 200:
                break
            if time.monotonic() - t0 > self.ready_timeout:
                raise ServerError(f"{self.label} not ready after {self.ready_timeout:.0f} s")
            time.sleep(0.25)
        status, body = http_get(self.url + "/v1/models")
        try:
            self.model = json.loads(body)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            self.model = "default"
        log(f"{self.label} ready on {self.url} in {time.monotonic() - t0:.1f} s (model {self.model!r})")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.sample_rss()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
        if self in _running:
            _running.remove(self)
        self.proc = None

    def sample_rss(self):
        """Folds the process's VmHWM (its peak RSS so far) into peak_rss_kib."""
        if self.proc is not None and self.proc.poll() is None:
            self.peak_rss_kib = _max(self.peak_rss_kib, vm_hwm_kib(self.proc.pid))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


def stop_all():
    for s in list(_running):
        try:
            s.stop()
        except Exception as e:  # noqa: BLE001
            log(f"stopping {s.label}: {e}")


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.results = {}  # server -> phase -> chatbench summary (or {"error": ...})
        self.rss = {}  # server -> peak RSS KiB
        self.problems = []

    def chatbench(self, server, phase, extra, wall_limit, check=False):
        a = self.args
        out_json = os.path.join(self.out, f"{server.label}-{phase}.json")
        argv = [a.python, a.chatbench, "--url", server.url, "--model", server.model, "--warmup",
                str(a.warmup)] + with_common(extra) + ["--output", out_json]
        if a.shape:
            # Random weights: every answer runs to max_tokens, the same work on every server.
            argv[-2:-2] = ["--extra-body", json.dumps({"ignore_eos": True})]
        if check:
            argv = [a.python, a.chatbench, "--url", server.url, "--model", server.model, "--check",
                    "--requests", "4", "--max-tokens", "16", "--seed", "100", "--output", out_json]
        log(f"{server.label} {phase}: chatbench {shlex.join(argv[2:])}")
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=wall_limit, cwd=ROOT)
        except subprocess.TimeoutExpired:
            msg = f"chatbench did not finish within {wall_limit} s (hung?)"
            log(f"{server.label} {phase}: {msg}")
            self.problems.append(f"{server.label} {phase}: {msg}")
            return {"error": msg, "hung": True}
        try:
            summary = json.loads(p.stdout)
        except ValueError:
            msg = f"chatbench exit {p.returncode}, no JSON: {p.stderr.strip()[-500:]}"
            log(f"{server.label} {phase}: {msg}")
            self.problems.append(f"{server.label} {phase}: {msg}")
            return {"error": msg}
        summary["_elapsed_s"] = round(time.monotonic() - t0, 2)
        summary["_chatbench_exit"] = p.returncode
        ok, bad = summary.get("requests_ok"), summary.get("requests_failed")
        log(f"{server.label} {phase}: ok={ok} failed={bad} decode_tps={_g(summary, 'decode_tps_per_request', 'median')}"
            f" ttft={_g(summary, 'ttft_s', 'median')} agg_tps={summary.get('aggregate_completion_tps')}"
            + (f" ttft_last/first={_g(summary, 'turns', 'ttft_last_over_first')}" if "turns" in summary else "")
            + (f" check_errors={_g(summary, 'check', 'violations_error')}" if check else ""))
        if bad and phase != "overload":
            for e in summary.get("errors", [])[:3]:
                log(f"    error: status={e.get('status')} {e.get('error')} {str(e.get('body', ''))[:200]}")
        return summary

    def run_server(self, key, make_server, phases, slots_matter=False, check=False):
        """Run `phases` against the server(s) `make_server(slots)` builds; restart when slots change."""
        a = self.args
        res = self.results.setdefault(key, {})
        peak = None
        server = None
        broken = None
        try:
            for phase, extra, slots in phases:
                if broken:
                    res[phase] = {"error": f"not run: {broken}"}
                    continue
                want = slots if slots_matter else None
                if server is None or (slots_matter and server.slots != want) or not server.alive():
                    if server is not None:
                        server.stop()
                        peak = _max(peak, server.peak_rss_kib)
                    server = make_server(want)
                    server.slots = want
                    try:
                        server.start()
                    except ServerError as e:
                        log(f"{e}; last lines of {server.log_path}:\n{tail(server.log_path)}")
                        self.problems.append(f"{key}: {e} (log {server.log_path})")
                        res[phase] = {"error": str(e)}
                        server.stop()
                        server = None
                        broken = str(e)
                        continue
                    if check:
                        res["check"] = self.chatbench(server, "check", [], a.run_timeout, check=True)
                        check = False
                limit = a.overload_timeout + 300 if phase == "overload" else a.run_timeout
                res[phase] = self.chatbench(server, phase, extra, limit)
                server.sample_rss()  # kept even if the server dies later
                if not server.alive():
                    rc = server.proc.returncode
                    how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
                    msg = f"{key}: server died during {phase} ({how})"
                    log(f"{msg}; last lines of {server.log_path}:\n{tail(server.log_path)}")
                    self.problems.append(msg)
        finally:
            if server is not None:
                server.stop()
                peak = _max(peak, server.peak_rss_kib)
        self.rss[key] = peak

    # ---- the servers ----

    def chatd(self, label, model, extra=()):
        a = self.args

        def make(_slots):
            return Server(label, lambda port: [a.chatd, "--model", model, "--listen", f"127.0.0.1:{port}",
                                                "--threads", str(a.threads), *extra],
                          os.path.join(self.out, f"{label}.log"), a.ready_timeout)
        return make

    def oga(self):
        a = self.args

        def make(_slots):
            return Server("oga", lambda port: [a.python, os.path.join(HERE, "oga_server.py"), "--model",
                                               a.genai_model, "--host", "127.0.0.1", "--port", str(port),
                                               "--threads", str(a.threads)],
                          os.path.join(self.out, "oga.log"), a.ready_timeout)
        return make

    def llama(self):
        a = self.args

        def make(slots):
            return Server("llama", lambda port: [a.llama_server, "-m", a.gguf, "-t", str(a.threads), "-c", "8192",
                                                 "--host", "127.0.0.1", "--port", str(port),
                                                 "-np", str(slots), *a.llama_extra],
                          os.path.join(self.out, "llama.log"), a.ready_timeout)
        return make

    def run(self):
        a = self.args
        phases = PHASES_QUICK if a.quick else PHASES_FULL
        self.run_server("chatd", self.chatd("chatd", a.genai_model), phases, check=True)
        if a.shape:
            # The extra chatd runs below are about SmolLM2's folders and the server's limits.
            if not a.skip_llama:
                self.run_server("llama", self.llama(), phases, slots_matter=True, check=True)
            return
        if a.speculative_tokens > 0:
            self.run_server("chatd_spec", self.chatd("chatd-spec", a.genai_model,
                                                     ("--speculative-tokens", str(a.speculative_tokens))), phases[:1])
        if a.throughput_slowdown > 0:
            self.run_server("chatd_throughput",
                            self.chatd("chatd-throughput", a.genai_model,
                                       ("--stream-slowdown", str(a.throughput_slowdown))),
                            [p for p in phases if p[0] == "c8"])
        self.run_server("chatd_optimum", self.chatd("chatd-optimum", a.optimum_model), phases[:1])
        if not a.skip_oga:
            self.run_server("oga", self.oga(), phases, check=True)
        if not a.skip_llama:
            self.run_server("llama", self.llama(), phases, slots_matter=True, check=True)
        n = 64 if a.quick else 128
        self.run_server("chatd_overload",
                        self.chatd("chatd-overload", a.genai_model, ("--max-queued", "16", "--max-running", "8")),
                        [("overload", ["--concurrency", "64", "--requests", str(n), "--max-tokens", "32",
                                       "--timeout", str(a.overload_timeout), "--seed", "106"], None)])


def _g(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _max(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def fmt(x, nd=2):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return None
    return a / b


def overload_stats(s):
    if not isinstance(s, dict) or "requests_ok" not in s:
        return None
    errors = s.get("errors", [])
    n429 = sum(1 for e in errors if e.get("status") == 429)
    timeouts = sum(1 for e in errors if "timeout" in str(e.get("error", "")).lower()
                   or "timed out" in str(e.get("error", "")).lower())
    other = len(errors) - n429
    statuses = {}
    for e in errors:
        statuses[str(e.get("status"))] = statuses.get(str(e.get("status")), 0) + 1
    return {"ok": s["requests_ok"], "n429": n429, "other_failures": other, "timeouts": timeouts,
            "statuses": statuses, "wall_s": s.get("wall_s"), "latency_max_s": _g(s, "latency_s", "max")}


def report(bench, args, started, versions):
    R = bench.results
    cols = ["chatd", "oga", "llama"]

    def m(key, *path):
        return _g(R.get(key, {}), *path)

    def turns_last(key, phase, field):
        pt = m(key, phase, "turns", "per_turn")
        return pt[-1].get(field) if isinstance(pt, list) and pt else None

    def prompt_tokens_computed(key, phase):
        """Prompt tokens the server ran over the whole chat (each turn's prompt less its cached
        tokens; medians over conversations): what the prefix caches left to compute."""
        pt = m(key, phase, "turns", "per_turn")
        if not isinstance(pt, list) or not pt:
            return None
        pairs = [(t.get("prompt_tokens_median"), t.get("cached_tokens_median")) for t in pt]
        if any(p is None or c is None for p, c in pairs):
            return None
        return sum(p - c for p, c in pairs)

    def failed(key, phase):
        s = R.get(key, {}).get(phase)
        if not isinstance(s, dict):
            return None
        if "requests_failed" in s:
            return s["requests_failed"]
        return "error"

    rows = []  # (metric, {col: value}, nd)
    rows.append(("single-stream decode tok/s (median per request)",
                 {c: m(c, "single", "decode_tps_per_request", "median") for c in cols}, 1))
    spec_single = m("chatd_spec", "single", "decode_tps_per_request", "median")
    if args.speculative_tokens > 0:
        rows.append((f"single-stream decode tok/s, chatd --speculative-tokens {args.speculative_tokens}",
                     {"chatd": spec_single, "oga": m("oga", "single", "decode_tps_per_request", "median"),
                      "llama": m("llama", "single", "decode_tps_per_request", "median")}, 1))
    rows.append(("single-stream TTFT s (median; lower is better)",
                 {c: m(c, "single", "ttft_s", "median") for c in cols}, 3))
    rows.append(("aggregate completion tok/s, c=4",
                 {c: m(c, "c4", "aggregate_completion_tps") for c in cols}, 1))
    rows.append(("failed requests, c=4", {c: failed(c, "c4") for c in cols}, 0))
    rows.append(("aggregate completion tok/s, c=8",
                 {c: m(c, "c8", "aggregate_completion_tps") for c in cols}, 1))
    peers_c8 = {c: m(c, "c8", "aggregate_completion_tps") for c in ("oga", "llama")}
    if args.throughput_slowdown > 0:
        rows.append((f"aggregate completion tok/s, c=8, chatd --stream-slowdown {args.throughput_slowdown}",
                     {"chatd": m("chatd_throughput", "c8", "aggregate_completion_tps"), **peers_c8}, 1))
    rows.append(("failed requests, c=8", {c: failed(c, "c8") for c in cols}, 0))
    rows.append(("TTFT s median at c=8 (lower is better)",
                 {c: m(c, "c8", "ttft_s", "median") for c in cols}, 3))
    if args.throughput_slowdown > 0:
        rows.append((f"TTFT s median at c=8, chatd --stream-slowdown {args.throughput_slowdown}",
                     {"chatd": m("chatd_throughput", "c8", "ttft_s", "median"),
                      **{c: m(c, "c8", "ttft_s", "median") for c in ("oga", "llama")}}, 3))
    for phase, conc in (("turns1", 1), ("turns2", 2)):
        if not any(m(c, phase) for c in cols):
            continue
        nt = m("chatd", phase, "config", "turns") or "N"
        rows.append((f"{nt}-turn chat, c={conc}: TTFT last/first turn (lower is better)",
                     {c: m(c, phase, "turns", "ttft_last_over_first") for c in cols}, 3))
        rows.append((f"{nt}-turn chat, c={conc}: cached tokens of the last turn",
                     {c: turns_last(c, phase, "cached_tokens_median") for c in cols}, 0))
        rows.append((f"{nt}-turn chat, c={conc}: prompt tokens of the last turn",
                     {c: turns_last(c, phase, "prompt_tokens_median") for c in cols}, 0))
        rows.append((f"{nt}-turn chat, c={conc}: prompt tokens computed over the chat (lower is better)",
                     {c: prompt_tokens_computed(c, phase) for c in cols}, 0))
        rows.append((f"{nt}-turn chat, c={conc}: TTFT s of the last turn (lower is better)",
                     {c: turns_last(c, phase, "ttft_s_median") for c in cols}, 3))
        rows.append((f"{nt}-turn chat, c={conc}: wall s of the whole chat (lower is better)",
                     {c: m(c, phase, "wall_s") for c in cols}, 1))
    rows.append(("peak RSS MiB (VmHWM; lower is better)",
                  {c: (bench.rss.get(c) / 1024 if bench.rss.get(c) else None) for c in cols}, 0))

    lines = []
    lines.append(f"# chatd vs onnxruntime-genai vs llama-server ({'QUICK smoke run' if args.quick else 'full run'})")
    lines.append("")
    lines.append(f"- date: {started.isoformat(timespec='seconds')} (finished {datetime.datetime.now().astimezone().isoformat(timespec='seconds')})")
    lines.append(f"- command: `{args.command}`")
    if args.shape:
        lines.append(f"- models: the {args.shape} shape (random weights): chatd on {args.genai_model}, "
                     f"llama-server on {args.gguf}; every request with ignore_eos")
    for k, v in versions.items():
        lines.append(f"- {k}: {v}")
    lines.append(f"- all runs: chatbench {' '.join(COMMON)} --warmup {args.warmup}; {args.threads} threads per server; "
                 "servers one at a time")
    lines.append(f"- raw chatbench summaries and server logs: `{args.out}`")
    lines.append("")
    lines.append("| metric | chatd | onnxruntime-genai | llama-server | chatd/oga | chatd/llama |")
    lines.append("|---|---|---|---|---|---|")
    for name, vals, nd in rows:
        cells = [fmt(vals[c], nd) if not (c == "oga" and args.skip_oga) and not (c == "llama" and args.skip_llama)
                 else "skipped" for c in cols]
        r_oga, r_llama = ratio(vals["chatd"], vals["oga"]), ratio(vals["chatd"], vals["llama"])
        lines.append(f"| {name} | {' | '.join(cells)} | {fmt(r_oga) + 'x' if r_oga is not None else '-'} | "
                     f"{fmt(r_llama) + 'x' if r_llama is not None else '-'} |")
    lines.append("")
    single = m("chatd", "single", "decode_tps_per_request", "median")
    c8 = m("chatd", "c8", "aggregate_completion_tps")
    lines.append("chatd only:")
    lines.append("")
    lines.append(f"- aggregate tok/s at c=8 over chatd's own single-stream decode tok/s: {fmt(ratio(c8, single))}x "
                 f"({fmt(c8, 1)} / {fmt(single, 1)})")
    lines.append(f"- chatd on the Optimum folder (`{os.path.relpath(args.optimum_model, ROOT)}`), single stream: "
                 f"decode {fmt(m('chatd_optimum', 'single', 'decode_tps_per_request', 'median'), 1)} tok/s, "
                 f"TTFT {fmt(m('chatd_optimum', 'single', 'ttft_s', 'median'), 3)} s, peak RSS "
                 f"{fmt(bench.rss['chatd_optimum'] / 1024 if bench.rss.get('chatd_optimum') else None, 0)} MiB")
    ov_summary = R.get("chatd_overload", {}).get("overload")
    ov = overload_stats(ov_summary)
    hung = isinstance(ov_summary, dict) and ov_summary.get("hung")
    if ov:
        lines.append(f"- overload (chatd --max-queued 16 --max-running 8; c=64, {ov['ok'] + sum(ov['statuses'].values())} "
                     f"requests, --max-tokens 32, --timeout {args.overload_timeout}): {ov['ok']} ok, {ov['n429']} x 429, "
                     f"{ov['other_failures']} other failures ({ov['timeouts']} timeouts), statuses {ov['statuses']}, "
                     f"wall {fmt(ov['wall_s'], 1)} s, slowest request {fmt(ov['latency_max_s'], 1)} s")
    else:
        lines.append(f"- overload: no result ({_g(ov_summary, 'error') if ov_summary else 'not run'})")
    for key, label in (("chatd", "chatd"), ("oga", "oga_server.py"), ("llama", "llama-server")):
        chk = R.get(key, {}).get("check")
        if chk:
            lines.append(f"- {label} `chatbench --check` (4 requests, mixed streaming): {chk.get('requests_ok')} ok, "
                         f"{_g(chk, 'check', 'violations_error')} shape errors, "
                         f"{_g(chk, 'check', 'violations_warning')} warnings"
                         + "".join(f"; {v.get('severity')} {v.get('where')}: {v.get('message')}"
                                   for v in (_g(chk, "check", "violations") or [])))
    lines.append("")

    # targets
    targets = []

    def target(name, ok, detail):
        targets.append((name, ok, detail))

    for peer, label, skipped in (("oga", "onnxruntime-genai", args.skip_oga), ("llama", "llama-server", args.skip_llama)):
        peer_single = m(peer, "single", "decode_tps_per_request", "median")
        r = ratio(single, peer_single)
        target(f"single-stream decode >= {T_SINGLE_OVER_PEERS}x {label}",
               None if skipped or r is None else r >= T_SINGLE_OVER_PEERS,
               "skipped" if skipped else f"{fmt(r)}x ({fmt(single, 1)} vs {fmt(peer_single, 1)} tok/s)")
        if args.speculative_tokens > 0:
            r = ratio(spec_single, peer_single)
            target(f"single-stream decode with --speculative-tokens {args.speculative_tokens} >= "
                   f"{T_SINGLE_OVER_PEERS}x {label}",
                   None if skipped or r is None else r >= T_SINGLE_OVER_PEERS,
                   "skipped" if skipped else f"{fmt(r)}x ({fmt(spec_single, 1)} vs {fmt(peer_single, 1)} tok/s)")
    llama_c8 = m("llama", "c8", "aggregate_completion_tps")
    r = ratio(c8, llama_c8)
    target(f"aggregate tok/s at c=8 >= {T_C8_OVER_LLAMA}x llama-server's",
           None if args.skip_llama or r is None else r >= T_C8_OVER_LLAMA,
           "skipped" if args.skip_llama else f"{fmt(r)}x ({fmt(c8, 1)} vs {fmt(llama_c8, 1)} tok/s)")
    r = ratio(c8, single)
    target(f"aggregate tok/s at c=8 >= {T_C8_OVER_OWN_SINGLE}x chatd's single-stream decode",
           None if r is None else r >= T_C8_OVER_OWN_SINGLE, f"{fmt(r)}x")
    tr = m("chatd", "turns1", "turns", "ttft_last_over_first")
    nt = m("chatd", "turns1", "config", "turns")
    target(f"TTFT of turn {nt}/turn 1 <= {T_TURNS_TTFT_RATIO} (c=1)",
           None if tr is None else tr <= T_TURNS_TTFT_RATIO, fmt(tr, 3))
    wall, llama_wall = m("chatd", "turns1", "wall_s"), m("llama", "turns1", "wall_s")
    r = ratio(wall, llama_wall)
    target(f"{nt}-turn chat (c=1) wall time <= {T_TURNS_WALL_OVER_LLAMA}x llama-server's",
           None if args.skip_llama or r is None else r <= T_TURNS_WALL_OVER_LLAMA,
           "skipped" if args.skip_llama else f"{fmt(r)}x ({fmt(wall, 1)} vs {fmt(llama_wall, 1)} s)")
    f8 = failed("chatd", "c8")
    target("zero failed requests at c=8", None if f8 is None or f8 == "error" else f8 == 0, f"{f8} failed")
    if ov:
        ok = (not hung) and ov["other_failures"] == 0 and ov["n429"] > 0
        target("overload at c=64: 429s, no hangs or other failures", ok,
               f"{ov['n429']} x 429, {ov['other_failures']} other failures, {ov['timeouts']} timeouts")
    else:
        target("overload at c=64: 429s, no hangs or other failures", False if hung else None,
               "chatbench hung" if hung else "no result")

    lines.append("Targets:")
    lines.append("")
    for name, ok, detail in targets:
        mark = "MET" if ok else ("NOT MET" if ok is False else "n/a")
        lines.append(f"- [{mark}] {name}: {detail}")
    if bench.problems:
        lines.append("")
        lines.append("Problems:")
        lines.append("")
        for p in bench.problems:
            lines.append(f"- {p}")
    return "\n".join(lines) + "\n", targets


def versions_of(args):
    v = {}

    def run(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            return (p.stdout + p.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"? ({e})"

    v["chatd"] = run([args.chatd, "--version"]).splitlines()[0] if os.path.exists(args.chatd) else "?"
    if not args.skip_oga:
        v["onnxruntime-genai"] = run([args.python, "-c", "import onnxruntime_genai as og; print(og.__version__)"])
    if not args.skip_llama:
        lv = [x for x in run([args.llama_server, "--version"]).splitlines() if x.startswith("version")]
        v["llama-server"] = (lv[0] if lv else "?") + f" (llama-cpp-python {args.llama_version} sdist), "\
            f"GGUF {os.path.basename(args.gguf)}"
    cpu = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    v["machine"] = f"{cpu}, {os.cpu_count()} CPUs, {platform.platform()}"
    try:
        v["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return v


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chatd", default=os.path.join(ROOT, "target", "release", "chatd"))
    p.add_argument("--genai-model", default=os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct-genai"))
    p.add_argument("--optimum-model", default=os.path.join(ROOT, "..", "shared", "models", "smollm2-135m-instruct"))
    p.add_argument("--llama-server", default=None)
    p.add_argument("--llama-version", default="?")
    p.add_argument("--llama-extra", default="", help="extra llama-server arguments (one string)")
    p.add_argument("--gguf", default=None)
    p.add_argument("--python", default=sys.executable, help="python with onnxruntime_genai (runs chatbench too)")
    p.add_argument("--chatbench", default=os.path.join(ROOT, "..", "shared", "tools", "chatbench.py"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for a server to become ready")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="wall limit of one chatbench run")
    p.add_argument("--overload-timeout", type=float, default=120.0, help="chatbench --timeout of the overload run")
    p.add_argument("--speculative-tokens", type=int, default=8,
                   help="also run chatd's single stream with this many draft tokens (0: not)")
    p.add_argument("--throughput-slowdown", type=float, default=6.0,
                   help="also run chatd's c8 phase with this --stream-slowdown (0: not)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shape", default=None, help="the realistic shape --genai-model and --gguf hold (see bench-peers.sh)")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--skip-oga", action="store_true")
    p.add_argument("--strict", action="store_true", help="exit 3 when a target is not met")
    p.add_argument("--out", default=None)
    p.add_argument("--command", default=None, help="the command line to print in the report")
    args = p.parse_args()
    args.llama_extra = shlex.split(args.llama_extra)
    args.command = args.command or shlex.join(sys.argv)
    if not args.skip_llama and not (args.llama_server and args.gguf):
        p.error("--llama-server and --gguf are needed unless --skip-llama")
    for path in [args.chatd, args.chatbench] + ([args.llama_server, args.gguf] if not args.skip_llama else []):
        if not os.path.exists(path):
            p.error(f"not found: {path}")
    started = datetime.datetime.now().astimezone()
    if args.out is None:
        args.out = os.path.join(ROOT, "target", "bench-peers", started.strftime("%Y%m%d-%H%M%S")
                                + ("-quick" if args.quick else ""))
    os.makedirs(args.out, exist_ok=True)
    args.out = os.path.abspath(args.out)
    for k in ("genai_model", "optimum_model", "chatbench"):
        setattr(args, k, os.path.abspath(getattr(args, k)))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    versions = versions_of(args)
    bench = Bench(args)
    log(f"results in {args.out}")
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        raise SystemExit(130)
    finally:
        stop_all()
    text, targets = report(bench, args, started, versions)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"started": started.isoformat(), "command": args.command, "versions": versions,
                   "quick": args.quick, "results": bench.results,
                   "peak_rss_kib": bench.rss, "problems": bench.problems,
                   "targets": [{"target": n, "met": ok, "detail": d} for n, ok, d in targets]}, f, indent=2)
    print(text)
    log(f"report: {os.path.join(args.out, 'report.md')}")
    if bench.problems:
        sys.exit(1)
    if args.strict and any(ok is False for _, ok, _ in targets):
        sys.exit(3)


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
