"""chatd through the official `openai` Python package: a chat completion, then a streamed one.

    pip install openai
    python examples/http/openai_client.py

CHATD_URL is the daemon's root URL, without /v1 [http://127.0.0.1:8080], as for curl.sh.
"""

import os

from openai import OpenAI

root = os.environ.get("CHATD_URL", "http://127.0.0.1:8080").rstrip("/")
# chatd checks no key, but the client insists on one.
client = OpenAI(base_url=f"{root}/v1", api_key="none")

# chatd serves exactly one model; ask for its name rather than hard-coding it.
model = client.models.list().data[0].id
print(f"model: {model}")

messages = [{"role": "user", "content": "What is the capital of France?"}]
response = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0)
print(response.choices[0].message.content)
print(f"finish_reason: {response.choices[0].finish_reason}, usage: {response.usage}")

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=64,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    # The usage chunk that ends the stream has no choices.
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\nusage: {chunk.usage}")
