"""The order service: HTTP API, outbox relay, and the original Hello publisher."""
