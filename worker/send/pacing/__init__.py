"""Pacing requests to the organization's rate limit: the pacer and its parts."""

from worker.send.pacing.pacer import Pacer, Slot
from worker.send.pacing.window import BOUNDARY_MARGIN, SharedLimit, window_end

__all__ = ["BOUNDARY_MARGIN", "Pacer", "SharedLimit", "Slot", "window_end"]
