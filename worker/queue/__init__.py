"""Queue mode: invitations from a Redis Stream, shared by several workers."""
