"""Running a job: the runner, the file path into it, resume, dry run, progress, summary."""

from worker.run.files import run
from worker.run.summary import RunResult

__all__ = ["RunResult", "run"]
