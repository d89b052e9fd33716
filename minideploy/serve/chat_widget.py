"""An ipywidgets chat box for the notebooks, in front of a running api_server.

The client of `serve api_client` and `serve gradio` (the `openai` package,
streaming) inside JupyterLab: type a message, press Enter or Send, and the
answer streams into the transcript. The conversation lives in the widget and
is resent each turn (the HTTP API is stateless); Clear starts a new one. A
server error is shown in the transcript: an exception raised in a widget
callback would vanish into the kernel log.
"""
from __future__ import annotations

import html
from typing import Optional

import ipywidgets as widgets
import openai

from .api_client import connect, stream_reply

_ROLE_COLOURS = {"user": "#1f4e99", "assistant": "#1b6e2d", "error": "#a40000"}


class ChatWidget:
    def __init__(self, url: str, api_key: Optional[str] = None, **sampling):
        self.client, self.model = connect(url, api_key)
        self.sampling = sampling  # e.g. max_tokens, temperature: passed to every request
        self.history: list[dict] = []
        self.transcript = widgets.HTML()
        self.prompt = widgets.Text(placeholder=f"message to {self.model} (Enter sends)",
                                   continuous_update=False, layout=widgets.Layout(width="70%"))
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.clear_button = widgets.Button(description="Clear")
        # continuous_update=False: the value changes on Enter (or leaving the box), not per key.
        self.prompt.observe(lambda change: self.send(change["new"]), names="value")
        self.send_button.on_click(lambda _: self.send(self.prompt.value))
        self.clear_button.on_click(lambda _: self.clear())
        self.view = widgets.VBox([self.transcript,
                                  widgets.HBox([self.prompt, self.send_button, self.clear_button])])
        self._render(self.history)

    def send(self, message: str) -> str:
        """Send one user turn; returns the streamed answer ('' for an empty message or an error)."""
        message = message.strip()
        if not message:
            return ""
        self.prompt.value = ""  # fires the observer again with "": ignored above
        messages = self.history + [{"role": "user", "content": message}]
        reply = ""
        try:
            for piece in stream_reply(self.client, self.model, messages, **self.sampling):
                reply += piece
                self._render(messages + [{"role": "assistant", "content": reply + "▌"}])
        except openai.APIError as error:
            self._render(messages + [{"role": "error", "content": f"server error: {error}"}])
            return ""
        self.history = messages + [{"role": "assistant", "content": reply}]
        self._render(self.history)
        return reply

    def clear(self) -> None:
        self.history = []
        self._render(self.history)

    def _render(self, messages: list[dict]) -> None:
        lines = [f"<b style='color:{_ROLE_COLOURS[m['role']]}'>{m['role']}</b>: "
                 f"<span style='white-space:pre-wrap'>{html.escape(m['content'])}</span>" for m in messages]
        self.transcript.value = "<br>".join(lines) or f"<i>chatting with {html.escape(self.model)}</i>"

    def _ipython_display_(self):
        from IPython.display import display

        display(self.view)
