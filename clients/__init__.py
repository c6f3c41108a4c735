"""Python client and CLI for the gateway."""
