"""`minideploy serve gradio URL`: a Gradio chat page in front of a running api_server.

The page holds no model: every message goes to the API server over HTTP (the
same streaming client as `serve api_client`), so one server can back both.
"""
from __future__ import annotations

from typing import Optional

import gradio as gr

from .api_client import connect, stream_reply


def text_of(content) -> str:
    """Gradio hands message content as a string or a list of parts; the API wants text."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)


def build_demo(url: str, api_key: Optional[str] = None) -> gr.ChatInterface:
    client, model = connect(url, api_key)

    def respond(message: str, history: list[dict]):
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        reply = ""
        for piece in stream_reply(client, model, messages + [{"role": "user", "content": message}]):
            reply += piece
            yield reply

    return gr.ChatInterface(respond, title=f"minideploy · {model}", analytics_enabled=False,
                            description=f"streaming from the API server at {url}")


def run_gradio(url: str, server_name: str = "127.0.0.1", server_port: int = 6006,
               api_key: Optional[str] = None) -> int:
    build_demo(url, api_key).queue().launch(server_name=server_name, server_port=server_port)
    return 0
