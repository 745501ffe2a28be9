"""The one exception type that reaches the user as a message instead of a traceback."""


class LorakitError(Exception):
    """A problem with the user's input: config, data, model path, environment.

    The message must say what is wrong, where (file, row, key) and how to fix it. The CLI prints it
    and exits with code 2; anything else that escapes is a bug in lorakit and keeps its traceback.
    """
