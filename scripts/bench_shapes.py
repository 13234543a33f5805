#!/usr/bin/env python3
"""Engine-to-engine speed on realistic shapes: chatd, onnxruntime-genai and llama.cpp, 2 threads each.

For each shape folder made by scripts/perf-models.sh (random weights, real shapes):
  chatd      target/release/chatd on genai-int4/, over HTTP (/v1/completions, greedy, ignore_eos),
             one request at a time; prefill from time to first token with a fresh prompt, decode
             from the rest. Its request log line gives the engine's own split (model run,
             sampling, detokenization); HTTP is the remainder.
  genai      onnxruntime-genai's Python API on the same folder (intra_op_num_threads 2 through a
             copy of genai_config.json beside symlinks): append_tokens(prompt), then
             generate_next_token() per token.
  llama.cpp  llama-bench -p PROMPT -n NEW -t 2 on q4_0.gguf (when given).
Runs alternate between the engines, each repeat after one uncounted warm-up; medians are shown.
Then each engine reads one long prompt (--long-prompt-tokens, ~2,000) for its time to first
token.
Driven by scripts/bench-shapes.sh.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("The old lighthouse stood at the edge of the cliff for more than a century, guiding fishing boats home "
         "through storms and fog. ")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def prompt_text(tag, tokens):
    # About 1.3 tokens per word on these vocabularies; the exact count comes back in `usage`.
    words = (WORDS * (tokens // 20 + 2)).split()[: int(tokens / 1.3)]
    return f"{tag} " + " ".join(words)


class Chatd:
    name = "chatd"

    def __init__(self, binary, folder, log_path):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [binary, "--model", str(folder), "--listen", f"127.0.0.1:{self.port}", "--threads", "2"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        end = time.time() + 300
        while time.time() < end:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.3)
        raise SystemExit("chatd did not start; see " + str(log_path))

    def run(self, tag, prompt_tokens, new_tokens):
        url = f"http://127.0.0.1:{self.port}/v1/completions"
        body = {"prompt": prompt_text(tag, prompt_tokens), "max_tokens": new_tokens, "ignore_eos": True,
                "temperature": 0}
        t0 = time.perf_counter()
        reply = post(url, body)
        wall = time.perf_counter() - t0
        usage = reply["usage"]
        time.sleep(0.05)
        line = [l for l in Path(self.log_path).read_text().splitlines() if "/v1/completions" in l][-1]
        ms = {k: float(v) / 1e3 for k, v in re.findall(r"(\w+)=([0-9.]+)ms", line)}
        n = usage["completion_tokens"]
        return {
            "prompt_tokens": usage["prompt_tokens"],
            "prefill_tps": usage["prompt_tokens"] / ms["ttft"],
            "decode_tps": (n - 1) / (wall - ms["ttft"]),
            "per_token_ms": {
                "model": 1e3 * ms["model"] / n,
                "sampling": 1e3 * ms["sample"] / n,
                "detokenize": 1e3 * ms["detok"] / n,
                "http_and_rest": 1e3 * (wall - ms["model"] - ms["sample"] - ms["detok"]) / n,
            },
        }

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


class Genai:
    name = "onnxruntime-genai"

    def __init__(self, folder, scratch):
        import onnxruntime_genai as og
        self.og = og
        view = scratch / "genai-2-threads"
        shutil.rmtree(view, ignore_errors=True)
        view.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name != "genai_config.json":
                (view / f.name).symlink_to(f.resolve())
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 2
        (view / "genai_config.json").write_text(json.dumps(config, indent=1))
        self.model = og.Model(str(view))
        self.tokenizer = og.Tokenizer(self.model)

    def run(self, tag, prompt_tokens, new_tokens):
        og = self.og
        ids = self.tokenizer.encode(prompt_text(tag, prompt_tokens))
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done() and n < new_tokens - 1:
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        return {"prompt_tokens": len(ids), "prefill_tps": len(ids) / (t1 - t0), "decode_tps": n / (t2 - t1)}

    def close(self):
        pass


class LlamaBench:
    name = "llama.cpp"

    def __init__(self, binary, gguf):
        self.binary, self.gguf = binary, gguf

    def run(self, tag, prompt_tokens, new_tokens):
        out = subprocess.run(
            [self.binary, "-m", str(self.gguf), "-p", str(prompt_tokens), "-n", str(new_tokens), "-t", "2", "-r", "1",
             "-o", "json"], check=True, capture_output=True, text=True).stdout
        rows = json.loads(out)
        pp = next(r for r in rows if r["n_prompt"] > 0)
        tg = next(r for r in rows if r["n_gen"] > 0)
        return {"prompt_tokens": prompt_tokens, "prefill_tps": pp["avg_ts"], "decode_tps": tg["avg_ts"]}

    def close(self):
        pass


def median(results, key):
    return statistics.median(r[key] for r in results)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, type=Path, help="scripts/perf-models.sh's models folder")
    p.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b")
    p.add_argument("--chatd", default=str(ROOT / "target/release/chatd"))
    p.add_argument("--llama-bench")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--long-prompt-tokens", type=int, default=2000, help="time to first token of one such prompt (0: not)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "target/bench-shapes")
    p.add_argument("--command", default="scripts/bench-shapes.sh")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = [f"`{args.command}`, {datetime.date.today()}, {os.cpu_count()} CPUs, prompt ~{args.prompt_tokens} tokens,"
              f" {args.new_tokens} new tokens, median of {args.repeats}", "",
              "| shape | engine | prefill tok/s | decode tok/s | decode vs genai | decode vs llama.cpp |",
              "|---|---|---|---|---|---|"]
    breakdown = []
    long_rows = []
    results = {}
    for shape in args.shapes.split(","):
        base = args.models / shape
        engines = [Chatd(args.chatd, base / "genai-int4", args.out / f"{shape}-chatd.log"),
                   Genai(base / "genai-int4", args.out)]
        if args.llama_bench and (base / "q4_0.gguf").exists():
            engines.append(LlamaBench(args.llama_bench, base / "q4_0.gguf"))
        runs = {e.name: [] for e in engines}
        for rep in range(args.repeats + 1):
            for e in engines:
                r = e.run(f"{rep}-{e.name}-{time.time_ns()}", args.prompt_tokens, args.new_tokens)
                if rep:
                    runs[e.name].append(r)
                print(f"{shape} {e.name} #{rep}: prefill {r['prefill_tps']:.1f} decode {r['decode_tps']:.1f}",
                      file=sys.stderr, flush=True)
        if args.long_prompt_tokens:
            ttft = {}
            for e in engines:
                # llama-bench takes a token count: chatd's, so that both read as many tokens.
                tokens = ttft["chatd"][0] if isinstance(e, LlamaBench) else args.long_prompt_tokens
                r = e.run(f"long-{e.name}-{time.time_ns()}", tokens, 2)
                ttft[e.name] = (r["prompt_tokens"], r["prompt_tokens"] / r["prefill_tps"])
                print(f"{shape} {e.name} long prompt: {ttft[e.name][0]} tokens, TTFT {ttft[e.name][1]:.2f} s",
                      file=sys.stderr, flush=True)
            for name, (tokens, t) in ttft.items():
                vs = f"{t / ttft['llama.cpp'][1]:.2f}x" if "llama.cpp" in ttft and name != "llama.cpp" else ""
                long_rows.append(f"| {shape} | {name} | {tokens} | {t:.2f} | {vs} |")
        for e in engines:
            e.close()
        decode = {n: median(rs, "decode_tps") for n, rs in runs.items()}
        for name, rs in runs.items():
            vs = lambda peer: f"{decode[name] / decode[peer]:.2f}x" if peer in decode and peer != name else ""
            report.append(f"| {shape} | {name} | {median(rs, 'prefill_tps'):.0f} | {decode[name]:.1f} | "
                          f"{vs('onnxruntime-genai')} | {vs('llama.cpp')} |")
        split = {k: statistics.median(r["per_token_ms"][k] for r in runs["chatd"])
                 for k in runs["chatd"][0]["per_token_ms"]}
        breakdown.append(f"| {shape} | " + " | ".join(f"{v:.2f}" for v in split.values()) + " |")
        results[shape] = runs
    report += ["", "chatd per generated token (ms, prefill included):", "",
               "| shape | model run | sampling | detokenization | HTTP and the rest |", "|---|---|---|---|---|"]
    report += breakdown
    if long_rows:
        report += ["", f"Time to first token of one ~{args.long_prompt_tokens}-token prompt (llama.cpp: llama-bench "
                   "over as many tokens as chatd's prompt, tokens / prefill tok/s):", "",
                   "| shape | engine | prompt tokens | TTFT s | vs llama.cpp |", "|---|---|---|---|---|"]
        report += long_rows
    text = "\n".join(report)
    print(text)
    (args.out / "report.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
