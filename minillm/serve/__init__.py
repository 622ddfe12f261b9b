"""Chapter 12: serving. An OpenAI-compatible HTTP server over one engine thread, and what it takes to measure one.

    python -m minillm serve --port 8000          # /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
    python -m minillm chat --server URL          # the terminal chat, through the server
    python -m minillm bench serve                # Poisson load, TTFT/TPOT/ITL percentiles, goodput under an SLO

Modules, one idea each:
    engine_loop.py   one thread steps the engine; requests come in and outputs go out through thread-safe queues
    admission.py     a bounded queue: refuse at the door (429) rather than let latency grow without limit
    protocol.py      OpenAI's request/response objects and server-sent events
    app.py           the FastAPI routes, errors in OpenAI's JSON shape, and a server started in a background thread
    metrics.py       Prometheus text: running/waiting requests, KV blocks, preemptions, prefix hits, TTFT/TPOT
    structured.py    structured output: logits masked by a small automaton, one mask per automaton state
    json_grammar.py  the automaton of one JSON object (bounded nesting: finitely many states)
    regex_grammar.py the automaton of a regex subset (Thompson's construction, simulated as a lazy DFA)
    loadgen.py       Poisson arrivals, a replayable trace, streamed requests, percentiles and goodput
"""
