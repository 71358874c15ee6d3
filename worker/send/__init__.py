"""Sending: the HTTP client, pacing to the rate limit, and carrying a batch to its outcome."""
