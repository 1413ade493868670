"""Running an export: one-shot inference, the streaming API, and the HTTP server."""
