"""A local emulator of Datadog's shared-dashboard invitation API (``--sandbox``, tests).

``server`` serves it over HTTP on loopback; ``model`` holds what it knows: dashboards,
faults, the rate window, the request log.
"""

from worker.emulator.dashboards import Dashboard, load_dashboards
from worker.emulator.model import FAULTS, Faults, Logged
from worker.emulator.server import Emulator

__all__ = ["FAULTS", "Dashboard", "Emulator", "Faults", "Logged", "load_dashboards"]
