"""The one error type a user can cause and fix."""


class MmdiagError(Exception):
    """Bad input from the user: a one-line message naming the field and the fix.

    The CLI prints it without a traceback and exits with code 2.
    """

    exit_code = 2
