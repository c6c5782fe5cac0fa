"""The chat page: a Gradio chat at ``/ui/`` over the web app's model service (``GET /`` redirects there)."""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from alpaca_cot.data.templates import record_from_messages
from alpaca_cot.serving.service import ModelService, text_of

UI_PATH = "/ui"


def mount_ui(app: FastAPI, service: ModelService, api_key: str | None) -> None:
    """Mount the chat page on ``app``; with ``api_key``, a login whose password is the key."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local server
    import gradio as gr

    async def chat(message: str, history: list[dict], max_new_tokens: float, temperature: float, top_p: float,
                   repetition_penalty: float) -> AsyncIterator[str]:
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        params = service.params(max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty)
        messages, length = await service.off_loop(service.fit_messages, messages, params.max_new_tokens)
        if length + params.max_new_tokens > service.window:
            raise gr.Error(f"The message and the answer do not fit the model's {service.window}-token context; "
                           "shorten the message or lower max new tokens.")
        answer = ""
        async for piece in service.stream(record_from_messages(messages), params):
            answer += piece
            yield answer

    d = service.defaults
    sliders = [
        gr.Slider(1, service.window, value=min(d.max_new_tokens, service.window), step=1, label="max new tokens"),
        gr.Slider(0, 2, value=d.temperature, step=0.05, label="temperature (0 = greedy)"),
        gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="top p"),
        gr.Slider(1, 3, value=d.repetition_penalty, step=0.05, label="repetition penalty"),
    ]
    page = gr.ChatInterface(chat, additional_inputs=sliders, additional_inputs_accordion="Sampling",
                            title=f"Alpaca-CoT · {service.model_id}", analytics_enabled=False,
                            chatbot=gr.Chatbot(label=service.model_id, height=480, buttons=["copy", "copy_all"]))

    def login(username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), (api_key or "").encode())

    gr.mount_gradio_app(app, page, path=UI_PATH, auth=login if api_key else None,
                        auth_message="Log in with any user name and the server's API key as the password.",
                        ssr_mode=False, footer_links=[])

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")
