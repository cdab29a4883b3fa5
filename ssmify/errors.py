"""The one exception type that the CLI turns into a one-line message and exit code 2."""

# Every character that str.splitlines() (and so a terminal or a log reader) may take as a line break.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_ESCAPES = {ord(char): repr(char)[1:-1] for char in LINE_BREAKS}


def one_line(text: str) -> str:
    """`text` with each line break written as its escape (\\n, \\u2028, ...): a value from the user's
    input (a key, a path, an argument) cannot split a message over several lines."""
    return text.translate(_ESCAPES)


class SsmifyError(Exception):
    """A problem with the user's input (a path, a field, a value), said in one line.

    Raise it where the problem is known, naming the file or field and what would be accepted.
    The CLI prints `ssmify: error: <message>` and exits with code 2, without a traceback.
    The message is kept to one line even when it quotes input that holds line breaks.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(str(message)))
