"""`lorakit serve`: one base model, many LoRA adapters, an OpenAI-compatible API, layered as vLLM's server.

    server.py    wiring: options, loading the base and the adapters, the adapter watcher, uvicorn (or vLLM)
    app.py       HTTP routes, thin: API key and body-size guard, errors in OpenAI's shape, JSON or SSE out
    serving.py   request logic, testable without HTTP: limits, adapter pinning, response models, streams
    engine.py    batched decoding of rows of mixed adapters
    threads.py   torch's CPU threads for the engine: one per core that other processes leave free
    adapters.py  the adapter registry: load, evict, hot reload
    protocol.py  pydantic request and response models (OpenAI's shapes, vLLM's adapter bodies)
    metrics.py   the counters /metrics reports, in Prometheus' text format

server.py builds app.py's routes over one Serving; a request goes app.py → serving.py → engine.py, and the
adapter it names is pinned in adapters.py for as long as its rows decode.
"""
