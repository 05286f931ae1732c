"""The openai Python package against `moepage serve`: chat, streaming with usage, and a tool-call loop.

MOEPAGE_URL is the server (default http://127.0.0.1:8000; a trailing /v1 is accepted), MOEPAGE_API_KEY its key:
`MOEPAGE_URL=http://127.0.0.1:8001 python clients/openai_client.py` for `moepage serve --port 8001`.
"""
import json
import os

from openai import OpenAI

server = os.environ.get("MOEPAGE_URL", "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
client = OpenAI(base_url=server + "/v1", api_key=os.environ.get("MOEPAGE_API_KEY", "none"))
model = client.models.list().data[0].id

reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=32)
print(reply.choices[0].message.content)

stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five."}],
                                        max_tokens=32, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")

tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
reply = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=128)
message = reply.choices[0].message
if message.tool_calls:
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        try:  # a model may write arguments that are not JSON (OpenAI's API documents the same): say so to it
            args = json.loads(call.function.arguments)
            result = {"city": args.get("city"), "temp_c": 21} if isinstance(args, dict) else {"error": "not an object"}
        except ValueError as exc:
            result = {"error": f"arguments are not JSON: {exc}"}
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    reply = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=128)
print(reply.choices[0].message.content)
