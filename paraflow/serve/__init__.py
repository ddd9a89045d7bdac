"""The image service: instances that keep a pipeline loaded (instance.py, engine.py, app.py)
behind HAProxy (haproxy.py), started and supervised by `python -m paraflow.serve` (supervisor.py),
with the prompt-embedding cache in each instance and in Redis (embeddings.py), LoRA adapters
chosen per request (adapters.py) and Prometheus metrics (metrics.py; deploy/prometheus,
deploy/grafana). Requests are checked before they reach a device (requests.py)."""
