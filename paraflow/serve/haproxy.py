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
- Route by size (serve.large): route.lua reads the body's "size", and requests of
  serve.large.min_pixels or more go to the `large` backend (rank groups) while one is up.
- Prometheus exporter and stats page on `front.stats_port`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

BACKEND = "instances"
STATUS_PATH = "/v1/instances"
ROUTE_LUA = Path(__file__).parent / "route.lua"


def _servers(backend: str, servers: Sequence[tuple[str, str]], interval_ms: int) -> list[str]:
    return [
        f"backend {backend}",
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {interval_ms}ms fall 2 rise 1 maxconn 1 "
        "observe layer4 error-limit 1 on-error mark-down",
        *(f"    server {name} {address} check" for name, address in servers),
        "",
    ]


def haproxy_config(serve: DictConfig, servers: Sequence[tuple[str, str]],
                   status: str | None = None, large: Sequence[tuple[str, str]] = ()) -> str:
    """The config text for `servers` [(name, host:port), ...]; `status`: the supervisor's
    host:port, which answers /v1/instances (the page's view of every instance); `large`: the
    rank-group instances that requests of serve.large.min_pixels or more go to (route.lua
    reads the size from the body), while any of them is up."""
    front = serve.front
    timeout = f"{int(float(front.timeout_s) * 1000)}ms"
    bufsize = max(16384, 2 * int(serve.limits.max_body_bytes))
    busy = ('{"error":{"message":"every instance is busy and the queue is full; retry later",'
            '"type":"rate_limit_error","param":null}}')
    queue, retry = int(front.max_queue), int(front.retry_after_s)
    full = (f"http-request return status 429 content-type application/json string '{busy}' "
            f"hdr Retry-After {retry} if")
    routed = [  # the size from the body, then each kind's own queue bound
        "    http-request lua.paraflow_pixels",
        f"    acl to_large var(txn.pixels) -m int ge {int(serve.large.min_pixels)}",
        "    acl large_up nbsrv(large) gt 0",
        f"    {full} to_large large_up {{ queue(large) ge {queue} }}",
        f"    {full} !to_large {{ queue({BACKEND}) ge {queue} }} || !large_up "
        f"{{ queue({BACKEND}) ge {queue} }}",
        "    use_backend large if to_large large_up",
    ]
    lines = [
        "global",
        f"    tune.bufsize {bufsize}",
        "    maxconn 4096",
        *([f"    lua-load {ROUTE_LUA}"] if large else []),
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
        *(routed if large else [f"    {full} {{ queue({BACKEND}) ge {queue} }}"]),
        *([f"    use_backend status if {{ path {STATUS_PATH} }}"] if status else []),
        f"    default_backend {BACKEND}",
        "",
        *(["backend status", f"    server supervisor {status}", ""] if status else []),
        *_servers(BACKEND, servers, int(front.check_interval_ms)),
        *(_servers("large", large, int(front.check_interval_ms)) if large else []),
        "frontend stats",
        f"    bind {front.host}:{int(front.stats_port)}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 2s",
        "",
    ]
    return "\n".join(lines)
