"""The one error type the ``fastlayers`` command reports as a line, not a traceback."""


class CommandError(Exception):
    """Bad input or an unusable file: ``fastlayers NAME: error: <message>``, exit status 2.

    Each part of the bench package raises its own subclass (``BenchError``,
    ``LayerError``, ``ProfileError``); a new command raises one of its own.
    """
