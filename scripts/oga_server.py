#!/usr/bin/env python3
"""A minimal OpenAI-compatible chat server around onnxruntime-genai, as a benchmark peer of chatd.

onnxruntime-genai ships no server, so this is the thinnest honest wrapper of its Python API: one
`og.Model` on the CPU with N intra-op threads, and one `og.Generator` per request. Generation is
serialized with a lock: onnxruntime-genai's CPU story is one request at a time (no batching across
requests), so concurrent requests wait for the lock, and that wait shows up in their TTFT.

    .venv/bin/python scripts/oga_server.py --model ../shared/models/smollm2-135m-instruct-genai \
        --host 127.0.0.1 --port 8090 --threads 2

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (non-streaming, and streaming SSE
`chat.completion.chunk` events ending with `data: [DONE]`; with `stream_options.include_usage` a final
chunk with `choices: []` carries the usage). The prompt is rendered with
`og.Tokenizer.apply_chat_template`; temperature 0 decodes greedily; `max_tokens` (or
`max_completion_tokens`) bounds the completion; `stop` strings are honoured. Standard library only,
besides onnxruntime_genai.
"""

import argparse
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import onnxruntime_genai as og

DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Engine:
    """The model, its tokenizer, and the lock that serializes generation."""

    def __init__(self, model_dir, threads):
        t0 = time.perf_counter()
        config = og.Config(model_dir)
        config.clear_providers()  # CPU
        config.overlay(
            json.dumps(
                {
                    "model": {
                        "decoder": {
                            "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
                        }
                    }
                }
            )
        )
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        with open(os.path.join(model_dir, "genai_config.json"), encoding="utf-8") as f:
            self.context_length = int(json.load(f)["model"].get("context_length", 8192))
        self.lock = threading.Lock()
        self.load_seconds = time.perf_counter() - t0

    def prompt_ids(self, messages):
        text = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return self.tokenizer.encode(text)

    def generate(self, prompt, max_tokens, sampling, should_stop):
        """Yields (token_id, text_piece) for every new token, eos excluded; must be driven to the end
        (or closed) while the caller holds self.lock."""
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + max_tokens, **sampling)
        generator = og.Generator(self.model, params)
        stream = self.tokenizer.create_stream()
        generator.append_tokens(prompt)
        produced = 0
        while produced < max_tokens and not generator.is_done() and not should_stop():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos:
                return
            produced += 1
            yield token, stream.decode(token)


def _text_of(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise ApiError(400, "only text content parts are supported", "messages")
        return "".join(parts)
    raise ApiError(400, "message content must be a string or an array of text parts", "messages")


def parse_request(body):
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    msgs = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "every message needs a 'role'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        msgs.append({"role": role, "content": _text_of(m.get("content"))})
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if v is None:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ApiError(400, f"'{name}' must be a non-negative number", name)
    temperature = 1.0 if temperature is None else float(temperature)
    top_p = 1.0 if top_p is None else float(top_p)
    if temperature == 0.0:
        sampling = {"do_sample": False}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if isinstance(body.get("seed"), int):
            sampling["random_seed"] = body["seed"]
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of strings", "stop")
    stop = [s for s in stop if s]
    stream = bool(body.get("stream", False))
    opts = body.get("stream_options") or {}
    include_usage = stream and isinstance(opts, dict) and bool(opts.get("include_usage"))
    return msgs, max_tokens, sampling, stop, stream, include_usage


class StopScanner:
    """Holds back just enough text to cut the completion at the first stop string."""

    def __init__(self, stops):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, piece):
        """Text that may be sent now."""
        if not self.stops:
            return piece
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        if len(self.pending) > self.keep:
            n = len(self.pending) - self.keep
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        return ""

    def flush(self):
        out, self.pending = self.pending, ""
        return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "oga-server/0.1"
    engine = None  # set in main()
    model_name = "default"

    def log_message(self, fmt, *args):  # quiet: one line per request at most, to stderr
        if self.server.verbose:
            sys.stderr.write("%s - %s\n" % (self.address_string(), fmt % args))

    def _json(self, status, obj):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path in ("/health", "/healthz"):
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "onnxruntime-genai"}]})
        else:
            self._json(404, ApiError(404, f"no route for GET {self.path}").body())

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            self._json(404, ApiError(404, f"no route for POST {self.path}").body())
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "the request body is not valid JSON")
            msgs, max_tokens, sampling, stop, stream, include_usage = parse_request(body)
            prompt = self.engine.prompt_ids(msgs)
            room = self.engine.context_length - len(prompt)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(prompt)} tokens; the context holds "
                                    f"{self.engine.context_length}", "messages", "context_length_exceeded")
            max_tokens = min(max_tokens, room)
        except ApiError as e:
            self._json(e.status, e.body())
            return
        except Exception as e:  # noqa: BLE001 - report, don't crash the handler thread
            self._json(500, ApiError(500, f"{type(e).__name__}: {e}").body())
            return
        rid = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())
        if stream:
            self._stream(rid, created, prompt, max_tokens, sampling, stop, include_usage)
        else:
            self._complete(rid, created, prompt, max_tokens, sampling, stop)

    def _usage(self, prompt, n):
        return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n,
                "prompt_tokens_details": {"cached_tokens": 0}}

    def _complete(self, rid, created, prompt, max_tokens, sampling, stop):
        scanner = StopScanner(stop)
        parts, n = [], 0
        try:
            with self.engine.lock:
                for _, piece in self.engine.generate(prompt, max_tokens, sampling, lambda: scanner.stopped):
                    n += 1
                    parts.append(scanner.feed(piece))
        except Exception as e:  # noqa: BLE001
            self._json(500, ApiError(500, f"generation failed: {type(e).__name__}: {e}").body())
            return
        if not scanner.stopped:
            parts.append(scanner.flush())
        finish = "stop" if scanner.stopped or n < max_tokens else "length"
        self._json(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "logprobs": None, "finish_reason": finish}],
            "usage": self._usage(prompt, n),
        })

    def _stream(self, rid, created, prompt, max_tokens, sampling, stop, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection closes
        self.end_headers()
        self.close_connection = True

        def chunk(delta, finish=None, choices=True, usage=None):
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                   if choices else []}
            if include_usage:
                obj["usage"] = usage
            self.wfile.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")
            self.wfile.flush()

        scanner = StopScanner(stop)
        n = 0
        try:
            chunk({"role": "assistant", "content": ""})
            with self.engine.lock:
                for _, piece in self.engine.generate(prompt, max_tokens, sampling, lambda: scanner.stopped):
                    n += 1
                    text = scanner.feed(piece)
                    if text:
                        chunk({"content": text})
            if not scanner.stopped:
                rest = scanner.flush()
                if rest:
                    chunk({"content": rest})
            finish = "stop" if scanner.stopped or n < max_tokens else "length"
            chunk({}, finish)
            if include_usage:
                chunk(None, choices=False, usage=self._usage(prompt, n))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the generator (and the lock) were released on the way out
        except Exception as e:  # noqa: BLE001
            try:
                err = ApiError(500, f"generation failed: {type(e).__name__}: {e}").body()
                self.wfile.write(b"data: " + json.dumps(err).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            except OSError:
                pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="onnxruntime-genai model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--served-model-name", default=None, help="model name in responses [folder name]")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    args = p.parse_args()

    Handler.engine = Engine(args.model, args.threads)
    Handler.model_name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.verbose = args.verbose
    sys.stderr.write(f"oga_server: onnxruntime-genai {og.__version__}, model {args.model} loaded in "
                     f"{Handler.engine.load_seconds:.2f} s, {args.threads} intra-op threads; "
                     f"listening on http://{args.host}:{args.port}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
