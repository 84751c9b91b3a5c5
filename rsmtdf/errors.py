"""The one exception type the CLI reports as a single line instead of a traceback."""


class RsmtdfError(Exception):
    """A problem with the user's input (a file, a cache, a checkpoint), said in one line.

    The message names the file and the problem; the CLI prints it and exits non-zero.
    """
