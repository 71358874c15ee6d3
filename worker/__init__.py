"""invite-worker: send Datadog shared-dashboard invitations in bulk."""

__version__ = "0.1.0"
