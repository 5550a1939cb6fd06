"""Drives `binllm serve` with the official `openai` client (what the Rust test
openai_client.rs runs): completions and chat, whole and streamed, and three refusals. Prints
one JSON object with what came back."""

import json
import sys

import openai
from openai import OpenAI

base_url, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
out = {"openai_version": openai.__version__}

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, temperature=0)
out["completion"] = {
    "text": c.choices[0].text,
    "finish_reason": c.choices[0].finish_reason,
    "usage": c.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
}
pieces, finish = [], None
for chunk in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=24, temperature=0, stream=True
):
    pieces.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
out["completion_stream"] = {"text": "".join(pieces), "finish_reason": finish, "chunks": len(pieces)}

messages = [
    {"role": "system", "content": "You tell stories."},
    {"role": "user", "content": "Tell me about a cat."},
]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, seed=1)
out["chat"] = {
    "role": r.choices[0].message.role,
    "text": r.choices[0].message.content,
    "finish_reason": r.choices[0].finish_reason,
    "usage": r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
}
pieces, finish, usage, role = [], None, None, None
for chunk in client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    for choice in chunk.choices:
        role = choice.delta.role or role
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
out["chat_stream"] = {"role": role, "text": "".join(pieces), "finish_reason": finish, "usage": usage}

errors = {}
try:
    client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
except openai.NotFoundError as e:
    errors["unknown_model"] = [e.status_code, e.code]
try:
    client.chat.completions.create(model=model, messages=messages, n=2)
except openai.BadRequestError as e:
    errors["n2"] = [e.status_code, e.param]
try:
    OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["wrong_key"] = [e.status_code, e.code]
out["errors"] = errors
out["models"] = [m.id for m in client.models.list()]
print(json.dumps(out))
