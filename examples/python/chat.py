"""One question to a local model through libchat's Python binding, the answer streamed to
stdout as it is generated, then the token usage.

    pip install ./bindings/python
    LIBCHAT_PATH=target/release/libchat.so python examples/python/chat.py \
        ../shared/models/smollm2-135m-instruct-genai ["question"]

(from the repository root, after `cargo build --release`).
"""

import sys

import libchat


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(f'usage: {sys.argv[0]} MODEL_DIR ["question"]', file=sys.stderr)
        return 2
    question = sys.argv[2] if len(sys.argv) == 3 else "What is the capital of France?"
    request = {"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0}
    try:
        with libchat.Engine({"model": sys.argv[1]}) as engine, engine.stream(request) as stream:
            for piece in stream:
                print(piece, end="", flush=True)
    except libchat.ChatError as e:
        print(f"\n{e.status_name}: {e.message}", file=sys.stderr)
        return 1
    usage = stream.response["usage"]
    print(f"\n[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
