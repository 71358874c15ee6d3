"""Exit codes, and how a run's facts map onto them."""

from __future__ import annotations

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3


def exit_code(
    *,
    aborted: bool,
    halted: bool,
    interrupted: bool,
    incomplete: bool,
    stopping_is_normal: bool = False,
) -> int:
    """3 if refused keys, a fault or a signal stopped the run; 1 if rows are unsettled.

    ``stopping_is_normal``: a queue worker stopped by SIGTERM has lost nothing (what it
    did not settle stays pending in the group), so an interruption alone is not exit 3.
    """
    if aborted or halted or (interrupted and not stopping_is_normal):
        return EXIT_ABORTED
    return EXIT_INCOMPLETE if incomplete else EXIT_OK
