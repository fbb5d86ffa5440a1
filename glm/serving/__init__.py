"""Serving a GLM over HTTP: `engine` (the continuous-batching decode loop that owns the model), `text`
(answer tokens to streamed text, stop strings), `schema` (request validation and decoding settings),
`metrics` (Prometheus), `app` (the FastAPI app and its middleware), `static/index.html` (the page).
server.py at the root runs it."""
