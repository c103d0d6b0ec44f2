"""The OpenAI-compatible HTTP server (`rawpaged serve`).

    app.py           routes, uvicorn with graceful shutdown, run_server(args), BackgroundServer
    state.py         per-server state, the worker-thread pool, the API endpoint wrapper (errors, log line)
    serving.py       /v1/completions, /v1/chat/completions, /tokenize, /detokenize
    async_engine.py  the engine stepping on a thread of its own; one async stream per request
    protocol.py      OpenAI request JSON -> typed requests + SamplingParams; OpenAI-shaped errors
    responses.py     RequestOutputs -> OpenAI response bodies, stream chunks and logprobs
    chat.py          chat templates (Jinja, rendered the way Hugging Face transformers does, bounded)
    limits.py        body / prompt / header / connection limits and timeouts
    logs.py          one line per request, the periodic engine line, JSON logs, the flood filter
    metrics.py       /metrics under vLLM's names (prometheus-client, one registry per server)

Needs the `server` extra: starlette, uvicorn, jinja2, prometheus-client.
"""
