"""The exceptions a user is meant to read: ParaflowError (a bad value named, with what is
allowed) and RankFailed (a rank of a run failed: which, why, where); and the record of where each
rank is, which RankFailed is built from."""


class ParaflowError(Exception):
    """A problem with the user's input or set-up; printed without a traceback, exit code 2."""


class RankFailed(RuntimeError):
    """A rank of a multi-rank run raised, exited or was killed. `str(err)` is the one line a user
    reads (which rank, why, and where it was: "rank 1 was killed by SIGKILL during denoise step 3
    of 20"); the original exception is `err.__cause__`. The CLI prints it and exits 1."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


# Where each rank is, left behind for the launcher. A rank killed from outside (SIGKILL, the OOM
# killer) cannot say where it was, so every rank keeps its stage and step in memory and, when the
# launcher gives it a folder, in a small file there that the launcher reads once the rank is gone:
# `rank-N.json` (pid, stage, step, steps; rewritten in place, padded, no fsync: a page-cache write
# survives the death of the process) and `rank-N.error` (the one-line cause, if it raised).
# Stdlib only: the CLI imports this module before torch.
STATE_DIR_ENV = "PARAFLOW_STATE_DIR"  # a folder for the state files (tests, debugging)
_STATE_BYTES = 256


class _RankState:
    def __init__(self) -> None:
        self.rank: int | None = None
        self.stage = "start-up"
        self.step: int | None = None
        self.steps: int | None = None
        self.error: str | None = None
        self.directory: str | None = None
        self._fd: int | None = None

    def where(self) -> str:
        if self.step is not None:
            return f"during {self.stage} step {self.step} of {self.steps}"
        return self.stage if self.stage.startswith(("after ", "during ")) else \
            f"during {self.stage}"


_STATE = _RankState()


def track_rank(rank: int, directory: str | None) -> None:
    """Start this process's record as `rank` (its file in `directory`, if given)."""
    import os

    global _STATE
    stop_tracking()
    _STATE = _RankState()
    _STATE.rank, _STATE.directory = rank, directory
    if directory is not None:
        for name in (f"rank-{rank}.json", f"rank-{rank}.error"):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
        _STATE._fd = os.open(os.path.join(directory, f"rank-{rank}.json"),
                             os.O_WRONLY | os.O_CREAT, 0o644)
    set_stage("start-up")


def set_stage(stage: str, step: int | None = None, steps: int | None = None) -> None:
    """Where this rank is now: `stage` ("denoise"), and its `step` of `steps` (1-based), if any.
    Called once per denoising step, so it is one small write, not a flush to disk."""
    import json
    import os

    _STATE.stage, _STATE.step, _STATE.steps = stage, step, steps
    if _STATE._fd is not None:
        line = json.dumps({"rank": _STATE.rank, "pid": os.getpid(), "stage": stage,
                           "step": step, "steps": steps, "where": _STATE.where()})
        os.pwrite(_STATE._fd, line.encode()[:_STATE_BYTES].ljust(_STATE_BYTES), 0)


def where_now() -> str:
    """This rank's place, as the failure messages say it ("during denoise step 3 of 20")."""
    return _STATE.where()


def stage_now() -> str:
    """The stage this process is in ("denoise"), or was in when it failed."""
    return _STATE.stage


def tracked_rank() -> int | None:
    return _STATE.rank


def record_failure(err: BaseException) -> str:
    """Note why this rank is failing (one line); returns it."""
    import os

    cause = one_line_cause(err)
    _STATE.error = cause
    if _STATE.directory is not None and _STATE.rank is not None:
        path = os.path.join(_STATE.directory, f"rank-{_STATE.rank}.error")
        with open(path, "w") as fh:
            fh.write(cause)
    return cause


def stop_tracking() -> None:
    """Close this rank's state file (the record in memory stays, for the failure message)."""
    import os

    if _STATE._fd is not None:
        os.close(_STATE._fd)
        _STATE._fd = None


def one_line_cause(err: BaseException) -> str:
    """`Type: message`, first line only and at most 300 characters; a ParaflowError is its
    message alone (it is written to be read)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(err, ParaflowError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def read_rank_state(directory: str, rank: int) -> dict[str, object]:
    """What rank `rank` left in `directory`: its last state ({} if none) and `error`, if any."""
    import json
    import os

    state: dict[str, object] = {}
    try:
        with open(os.path.join(directory, f"rank-{rank}.json"), "rb") as fh:
            state = json.loads(fh.read().decode().strip() or "{}")
    except (OSError, ValueError):  # not there yet, or read while being rewritten
        state = {}
    try:
        with open(os.path.join(directory, f"rank-{rank}.error")) as fh:
            state["error"] = fh.read().strip()
    except OSError:
        pass
    return state
