"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class SsmifyError(Exception):
    """A problem with the user's input (a path, a field, a value), said in one line.

    Raise it where the problem is known, naming the file or field and what would be accepted.
    The CLI prints `ssmify: error: <message>` and exits with code 2, without a traceback.
    """
