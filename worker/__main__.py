"""``python -m worker`` is the same as the ``invite-worker`` command."""

import sys

from worker.start import main

sys.exit(main())
