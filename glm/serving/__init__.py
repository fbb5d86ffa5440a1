"""Serving a GLM over HTTP: `engine` (the continuous-batching decode loop that owns the model), `runs` (a
request's sources and their events on the event loop), `text` (answer tokens to streamed text, stop
strings), `schema` (request validation and decoding settings), `app` (the FastAPI endpoints),
`middleware` (metrics per request, API key, body limit), `metrics` (Prometheus), `static/index.html`.
server.py at the root runs it."""
