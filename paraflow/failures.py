"""Which rank to blame for a failed launch, and the one line that says so.

torch.multiprocessing reports the first rank to exit non-zero, which is often a peer that only
noticed the failure (its transport lost the rank that really died). The state each rank leaves
(paraflow/errors.py: where it is, its pid, its own error) and every rank's exit code name the
rank that caused it, its cause (its exception's message, its exit code, or the signal that killed
it) and where it was.
"""

from __future__ import annotations

import re

from paraflow.errors import read_rank_state

# Errors a rank raises because ANOTHER rank is gone or stalled: the other rank is the cause.
_PEER_LOST = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout",
              "disterror", "distbackenderror", "distnetworkerror", "diststoreerror",
              "gloo", "nccl")


def about_a_peer(cause: str) -> bool:
    return any(word in cause.lower() for word in _PEER_LOST)


def this_rank_failed(rank: int, where: str, cause: str) -> str:
    if about_a_peer(cause):
        # "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:60545.
        # This is typically caused by ..." -> its first sentence, without the source location.
        cause = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", cause)
        cause = re.split(r"(?<=\.)\s+(?=[A-Z])", cause)[0]
        return f"rank {rank} stopped {where}: another rank is gone or stalled ({cause})"
    return f"rank {rank} failed {where}: {cause}"


def exit_codes_of(err: BaseException) -> dict[int, tuple[int, int | None]]:
    """Every spawned process's (pid, exit code) by spawn index, from the ProcessContext whose
    join raised `err` (in its traceback: torch.multiprocessing keeps them nowhere else)."""
    from torch.multiprocessing.spawn import ProcessContext

    tb = err.__traceback__
    while tb is not None:
        context = tb.tb_frame.f_locals.get("self")
        if isinstance(context, ProcessContext):
            return {i: (int(proc.pid), proc.exitcode)
                    for i, proc in enumerate(context.processes)}
        tb = tb.tb_next
    return {}


def _signal_name(exit_code: int) -> str:
    import signal

    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def explain_spawned_failure(err: Exception, state_dir: str | None, world: int,
                            exit_codes: dict[int, tuple[int, int | None]] | None = None,
                            ) -> tuple[str, int]:
    """The one line for a failed spawned launch, and the rank it names. torch.multiprocessing
    reports the first rank to exit non-zero; when that rank only lost a peer (its error is about
    the transport, or the transport aborted it) the rank that caused it is named instead: one
    that raised an error of its own, else one that died by a signal (not the SIGTERM the launch
    sends the survivors) or exited with a code of its own. `exit_codes`: spawn index -> (pid,
    exit code) of every rank, when known."""
    states = {r: read_rank_state(state_dir, r) for r in range(world)} if state_dir else {}
    rank_of_pid = {s.get("pid"): r for r, s in states.items()}
    pid, index = getattr(err, "error_pid", None), int(getattr(err, "error_index", 0))
    rank = rank_of_pid.get(pid, index)
    signal_name = getattr(err, "signal_name", None)
    exit_code = getattr(err, "exit_code", None)
    own = states.get(rank, {})
    secondary = (exit_code is None and about_a_peer(str(own.get("error", "")))) or \
        signal_name == "SIGABRT"  # a C++ abort in the transport, after a peer went away
    if secondary:
        raised = [r for r, s in sorted(states.items())
                  if r != rank and s.get("error") and not about_a_peer(str(s["error"]))]
        died = sorted((rank_of_pid.get(p, i), code) for i, (p, code) in (exit_codes or {}).items()
                      if code not in (None, 0, 1, -15) and not states.get(
                          rank_of_pid.get(p, i), {}).get("error"))
        if raised:
            rank, own = raised[0], states[raised[0]]
            exit_code = signal_name = None
        elif died and died[0][0] != rank:
            rank, code = died[0]
            own = states.get(rank, {})
            exit_code = code
            signal_name = _signal_name(code) if code is not None and code < 0 else None
    where = str(own.get("where", "during start-up"))
    if own.get("error") or exit_code is None:
        cause = str(own.get("error") or _last_line(str(getattr(err, "msg", err))))
        return this_rank_failed(rank, where, cause), rank
    if signal_name:
        return f"rank {rank} was killed by {signal_name} {where}", rank
    return f"rank {rank} exited with code {exit_code} {where}", rank


def _last_line(traceback_text: str) -> str:
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "an error"
