"""Serving a GLM over HTTP, split as vLLM's entrypoints split it:

  protocol.py     request bodies, their decoding settings, the error and event shapes every endpoint shares
  completions.py  OpenAI's /v1/completions and /v1/models
  blanks.py       GLM's /fill and /score
  status.py       /health, /ready, /metrics and the page (static/index.html)
  app.py          the app: shared state, middleware, error handlers, the routes of the three families
  state.py        what the endpoints share (the Predictor, the engine, the metrics, readiness)
  engine.py       the continuous-batching decode loop that owns the model
  runs.py         a request's sources and their events on the event loop
  text.py         answer tokens to streamed text, stop strings
  middleware.py   metrics per request, API key, body limit
  metrics.py      Prometheus
server.py at the root runs it.
"""
