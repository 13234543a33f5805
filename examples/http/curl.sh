#!/usr/bin/env bash
# chatd's HTTP API with curl: health, the model list, a chat completion, then a streamed one.
#
#   bash examples/http/curl.sh
#
# CHATD_URL is the daemon's root URL, without /v1 [http://127.0.0.1:8080].
set -euo pipefail
url="${CHATD_URL:-http://127.0.0.1:8080}"
url="${url%/}"
# -sS: no progress bar, but errors; --fail-with-body: an HTTP error shows its JSON and stops here.
curl_json() { curl -sS --fail-with-body -H 'Content-Type: application/json' "$@"; echo; }

echo "== GET /health"
curl_json "$url/health"

echo "== GET /v1/models"
curl_json "$url/v1/models"

# chatd serves one model, so requests may leave out "model".
echo "== POST /v1/chat/completions"
curl_json "$url/v1/chat/completions" -d '{
  "messages": [{"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 64,
  "temperature": 0
}'

# Server-sent events: one "data: {chat.completion.chunk}" per piece, then "data: [DONE]".
# -N prints each event as it arrives; include_usage adds a last chunk with the token counts.
echo "== POST /v1/chat/completions (stream)"
curl_json -N "$url/v1/chat/completions" -d '{
  "messages": [{"role": "user", "content": "Name three colours."}],
  "max_tokens": 64,
  "temperature": 0,
  "stream": true,
  "stream_options": {"include_usage": true}
}'
