"""The one exception type a user is meant to read: a bad value named, with what is allowed."""


class ParaflowError(Exception):
    """A problem with the user's input or set-up; printed without a traceback, exit code 2."""
