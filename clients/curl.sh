#!/usr/bin/env bash
# curl examples against `moepage serve`. MOEPAGE_URL is the server (default http://127.0.0.1:8000; a trailing /v1 is
# ignored): `MOEPAGE_URL=http://127.0.0.1:8001 bash clients/curl.sh` for `moepage serve --port 8001`. Add
# -H "Authorization: Bearer $KEY" when the server runs with --api-key.
set -euo pipefail
BASE=${MOEPAGE_URL:-http://127.0.0.1:8000}
BASE=${BASE%/}
BASE=${BASE%/v1}
MODEL=${MODEL:-$(curl -s "$BASE/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}

echo "== plain chat"
curl -s "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 32,
  \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"
echo

echo "== streaming with usage"
curl -sN "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 16, \"stream\": true, \"stream_options\": {\"include_usage\": true},
  \"messages\": [{\"role\": \"user\", \"content\": \"Count to five.\"}]}"

echo "== tools"
curl -s "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"max_tokens\": 64,
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the weather in Paris?\"}],
  \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather for a city\",
    \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}]}"
echo

echo "== fill in the middle (models with FIM tokens)"
curl -s "$BASE/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"def add(a, b):\\n    \", \"suffix\": \"\\n\\nprint(add(1, 2))\", \"max_tokens\": 16}"
echo

echo "== tokenize, metrics"
curl -s "$BASE/tokenize" -H 'Content-Type: application/json' -d '{"prompt": "hello world"}'
echo
curl -s "$BASE/metrics" | grep -E '^moepage_expert_cache_(hits|misses)_total'
