"""mxq.server — `mxq serve`: an OpenAI-compatible HTTP API for one .mxq model (the `serve` extra).

    engine.py    one worker thread runs generations one at a time from a bounded queue
    schema.py    request bodies → validated parameters (OpenAI fields, 400s that name the field)
    app.py       the Starlette app: routes, API key, OpenAI-shaped errors, server-sent events
    commands.py  the `mxq serve` click command

Nothing here is imported by mxq.runtime; this package imports the runtime's public API only.
"""
