"""`minideploy serve api_client URL`: multi-turn chat in the terminal against an api_server.

It uses the official `openai` client, so it also shows that the server speaks
the protocol; the conversation is kept here and resent each turn (the HTTP API
is stateless). 'end' starts a new conversation, 'exit' quits.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TextIO

from openai import OpenAI


def connect(url: str, api_key: Optional[str] = None) -> tuple[OpenAI, str]:
    """A client for the server at `url` and the name of the model it serves."""
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none")
    return client, client.models.list().data[0].id


def stream_reply(client: OpenAI, model: str, messages: list[dict], **sampling) -> Iterable[str]:
    """The assistant's answer to `messages`, piece by piece as the server streams it."""
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **sampling):
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def run_api_client(url: str, api_key: Optional[str] = None, turns: Optional[Iterable[str]] = None,
                   out: TextIO = sys.stdout, **sampling) -> int:
    from ..cli import read_turns

    client, model = connect(url, api_key)
    print(f"model: {model} at {url}  (type 'end' to reset the conversation, 'exit' to quit)", file=sys.stderr)
    history: list[dict] = []
    for turn in read_turns(sys.stdin) if turns is None else turns:
        if turn == "exit":
            break
        if turn == "end":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if not turn:
            continue
        messages = history + [{"role": "user", "content": turn}]
        reply = ""
        print("assistant> ", end="", file=out, flush=True)
        for piece in stream_reply(client, model, messages, **sampling):
            print(piece, end="", file=out, flush=True)
            reply += piece
        print(file=out, flush=True)
        history = messages + [{"role": "assistant", "content": reply}]
    return 0
