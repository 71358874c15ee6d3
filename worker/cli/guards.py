"""Checks made before a command opens anything for writing: what can only be a mistake.

A report, its journal, its lock, a plan or ``report failed``'s CSV written over the input
would destroy the rows it was meant to record, silently and for good. So every path a
command writes is compared with its input, as the paths resolve (symbolic links) and as
the files are (the same inode: hard links, a second name), and refused before any write,
``--overwrite`` or not.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from worker.errors import UsageError
from worker.record.files import reads_as_report
from worker.record.journal import journal_path
from worker.record.lock import lock_path


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names, links followed; None if nothing is there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _input_identity(source: str) -> tuple[int, int] | None:
    """(device, inode) of the input: the file, or standard input when it is a file."""
    if source == "-":
        try:
            st = os.fstat(sys.stdin.fileno())
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
    return _identity(Path(source))


def _stdout_identity() -> tuple[int, int] | None:
    """(device, inode) of the regular file standard output goes to, if it goes to one."""
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def same_file(written: Path, source: str) -> bool:
    """Whether writing ``written`` would write the input ``source`` (``-``: stdin)."""
    if source != "-" and written.resolve() == Path(source).resolve():
        return True
    mine, theirs = _identity(written), _input_identity(source)
    return mine is not None and mine == theirs


def check_not_input(source: str, outputs: dict[str, Path]) -> None:
    """Refuse when any of ``outputs`` (what -> path) is the input ``source`` itself."""
    for what, path in outputs.items():
        if same_file(path, source):
            shown = "standard input" if source == "-" else repr(source)
            raise UsageError(
                f"{what} {str(path)!r} is the input {shown} itself: writing it would destroy "
                "the rows it reads (--overwrite or not). Choose another path, e.g. "
                f"--report {_suggest(source)}"
            )


def check_failed_output(report: Path, output: Path, sources: Iterable[str]) -> None:
    """``report failed --output``: never the report, its journal, its lock, or the input
    of a run the report records (``sources``, as the runs named them)."""
    instead = report.with_name(report.stem + "-failed.csv")
    fix = f"(--overwrite or not). Choose another path, e.g. --output {instead}"
    if same_file(output, str(report)):
        raise UsageError(f"--output {str(output)!r} is the report itself: writing it would "
                         f"destroy the run's record of what it sent {fix}")  # fmt: skip
    for what, path in run_outputs(report, dry_run=False).items():
        if what != "the report (--report)" and same_file(output, str(path)):
            raise UsageError(f"--output {str(output)!r} is {what} {str(path)!r}: writing it "
                             f"would destroy the run's record of what it sent {fix}")  # fmt: skip
    if _beside_a_report(output) or (
        output.is_file() and output.stat().st_size and reads_as_report(output)
    ):
        # Any report's journal or lock, or another report: its record of what was sent.
        raise UsageError(f"--output {str(output)!r} is a report, or a report's journal or "
                         f"lock: writing it would destroy a run's record {fix}")  # fmt: skip
    for source in dict.fromkeys(sources):
        for place in _input_places(source, report):
            if same_file(output, place):
                raise UsageError(
                    f"--output {str(output)!r} is {source!r}, the input of a run in "
                    f"{str(report)!r}: writing it would destroy the rows it holds {fix}"
                )


def _input_places(source: str, report: Path) -> list[str]:
    """Where a run's input may be: a relative path is relative to where the run ran,
    which the report does not say, so here and beside the report are both taken."""
    if source in ("-", "<stdin>") or "://" in source:
        return []
    path = Path(source)
    if path.is_absolute():
        return [source]
    return [source, str(report.parent / path)]


def _suggest(source: str) -> str:
    if source == "-":
        return "invite-report.jsonl"
    return str(Path(source).with_name(Path(source).stem + "-report.jsonl"))


def run_outputs(report: Path, *, dry_run: bool) -> dict[str, Path]:
    """Every file a run (or a dry run) writes beside its input, named for a message."""
    first = "the plan (--report)" if dry_run else "the report (--report)"
    return {
        first: report,
        "its journal": journal_path(report),
        "its lock file": lock_path(report),
    }


def _beside_a_report(path: Path) -> str | None:
    """``journal`` or ``lock`` when ``path`` is named as a report's journal or lock would
    be (see :func:`journal_path`, :func:`lock_path`); None otherwise."""
    for what, beside in (("journal", journal_path), ("lock", lock_path)):
        suffix = beside(Path("r")).name[1:]  # what the function adds to a report's name
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return what
    return None


def check_report_path(report: Path, *, dry_run: bool = False) -> None:
    """A ``--report`` that is a folder, or whose folder is missing, said as such."""
    if report.is_dir():
        name = "invite-report.plan.jsonl" if dry_run else "invite-report.jsonl"
        raise UsageError(
            f"--report {str(report)!r} is a folder; name a file in it, e.g. "
            f"--report {str(report / name)!r}"
        )
    kind = _special(report)
    if kind is not None:
        # Opening a FIFO to write waits for a reader (a run hung before its first line),
        # and a device would be chmodded and get a journal and a lock beside it.
        raise UsageError(
            f"--report {str(report)!r} is not a regular file but {kind}: a report is read "
            "back, locked and synced to disk; name a file, e.g. --report "
            f"{'invite-report.plan.jsonl' if dry_run else 'invite-report.jsonl'}"
        )
    if (mine := _identity(report)) is not None and mine == _stdout_identity():
        # (--report /dev/stdout with stdout sent to a file): the records and what the
        # command prints would write over each other.
        raise UsageError(f"--report {str(report)!r} is the file standard output goes to; "
                         "name another file, e.g. --report invite-report.jsonl")  # fmt: skip
    for part, beside in (("journal", journal_path(report)), ("lock", lock_path(report))):
        if (kind := _special(beside)) is not None:  # (a FIFO there would hang the run too)
            raise UsageError(
                f"the {part} of --report {str(report)!r}, {str(beside)!r}, is not a regular "
                f"file but {kind}; a run makes it itself: remove it, or choose another "
                "--report"
            )
    if (what := _beside_a_report(report)) is not None:
        # A report named so would be another report's journal or lock (emptied by that
        # report's next run), or collide with it.
        stem = report.name.removesuffix(f".{what}")
        raise UsageError(
            f"--report {str(report)!r} ends in '.{what}', the name a report's {what} takes "
            f"beside it; choose another name, e.g. --report "
            f"{str(report.with_name(stem + '-report.jsonl'))!r}"
        )
    folder = report.resolve().parent
    if folder.is_dir() and not report.parent.is_dir():
        # As the system opens it: "missing/../r.jsonl" goes through a folder that is not
        # there, though the name resolves to one that is.
        folder = report.parent
    if not folder.is_dir():
        raise UsageError(
            f"the folder of --report {str(report)!r} does not exist ({str(folder)!r}); "
            f"create it first (mkdir -p {folder}) or choose another --report"
        )


def _special(path: Path) -> str | None:
    """What ``path`` names when it is there and is neither a file nor a folder (links
    followed, nothing opened: a FIFO would wait for a reader)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (a named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def writable_elsewhere(report: Path) -> str:
    """Where a dry run could write its plan instead, for a message: the temp folder."""
    return str(Path(tempfile.gettempdir()) / report.name)
