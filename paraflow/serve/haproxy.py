"""HAProxy's config, written from the serve config: the front door of the instances.

Chosen (and measured on this machine) so that no accepted request is lost and a slow or dead
instance gets less work:
- `balance leastconn` with `maxconn 1` per instance: a request waits in HAProxy's queue for the
  first free instance, so a slow one takes fewer; beyond `front.max_queue` waiting, 429 with
  Retry-After.
- `observe layer4 error-limit 1 on-error mark-down`: the first failed connection to an instance
  marks it down at once (without it leastconn keeps choosing a dead server, whose connection
  count is 0); `/readyz` checks bring it back when it answers again.
- `retry-on all-retryable-errors`, `retries`, `option redispatch 1`: a request whose instance
  died before answering is sent again, to another one (its body is buffered: bufsize covers
  the largest body an instance accepts).
- Prometheus exporter and stats page on `front.stats_port`.
"""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

BACKEND = "instances"
STATUS_PATH = "/v1/instances"


def haproxy_config(serve: DictConfig, servers: Sequence[tuple[str, str]],
                   status: str | None = None) -> str:
    """The config text for `servers` [(name, host:port), ...]; `status`: the supervisor's
    host:port, which answers /v1/instances (the page's view of every instance)."""
    front = serve.front
    timeout = f"{int(float(front.timeout_s) * 1000)}ms"
    bufsize = max(16384, 2 * int(serve.limits.max_body_bytes))
    busy = ('{"error":{"message":"every instance is busy and the queue is full; retry later",'
            '"type":"rate_limit_error","param":null}}')
    lines = [
        "global",
        f"    tune.bufsize {bufsize}",
        "    maxconn 4096",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        f"    timeout client {timeout}",
        f"    timeout server {timeout}",
        f"    timeout queue {timeout}",
        "    timeout http-request 10s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on all-retryable-errors",
        "",
        "frontend images",
        f"    bind {front.host}:{int(front.port)}",
        "    option http-buffer-request",
        f"    http-request return status 429 content-type application/json string '{busy}' "
        f"hdr Retry-After {int(front.retry_after_s)} if {{ queue({BACKEND}) ge "
        f"{int(front.max_queue)} }}",
        *([f"    use_backend status if {{ path {STATUS_PATH} }}"] if status else []),
        f"    default_backend {BACKEND}",
        "",
        *(["backend status", f"    server supervisor {status}", ""] if status else []),
        f"backend {BACKEND}",
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {int(front.check_interval_ms)}ms fall 2 rise 1 maxconn 1 "
        "observe layer4 error-limit 1 on-error mark-down",
        *(f"    server {name} {address} check" for name, address in servers),
        "",
        "frontend stats",
        f"    bind {front.host}:{int(front.stats_port)}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 2s",
        "",
    ]
    return "\n".join(lines)
