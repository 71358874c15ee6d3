"""Exit codes, and how a run's facts map onto them."""

from __future__ import annotations

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3


def exit_code(
    *,
    aborted: bool,
    halted: bool,
    interrupted: bool,
    incomplete: bool,
) -> int:
    """3 if refused keys, a fault or a signal stopped the run; 1 if rows are unsettled.

    The same in file and queue mode: a stop is exit 3 whether what is left waits for
    ``--resume`` or stays pending in the stream.
    """
    if aborted or halted or interrupted:
        return EXIT_ABORTED
    return EXIT_INCOMPLETE if incomplete else EXIT_OK
