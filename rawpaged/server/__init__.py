"""The OpenAI-compatible HTTP server (`rawpaged serve`).

    app.py           Starlette routes, auth, draining, uvicorn with graceful shutdown, run_server(args)
    async_engine.py  the engine stepping on a thread of its own; one async stream per request
    protocol.py      OpenAI request JSON -> SamplingParams (typed, range-checked); OpenAI-shaped errors
    responses.py     RequestOutputs -> OpenAI response bodies, stream chunks and logprobs
    chat.py          chat templates (Jinja, rendered the way Hugging Face transformers does)
    metrics.py       /metrics in the Prometheus text format

Needs the `server` extra: starlette, uvicorn, jinja2.
"""
