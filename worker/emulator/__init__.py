"""A local emulator of Datadog's shared-dashboard invitation API (``--sandbox``, tests).

``server`` serves it over HTTP on loopback; ``model`` holds what it knows: dashboards,
faults, the rate window, the request log.
"""

from worker.emulator.model import FAULTS, Dashboard, Faults, Logged
from worker.emulator.server import Emulator

__all__ = ["FAULTS", "Dashboard", "Emulator", "Faults", "Logged"]
