"""Serving gateway: vLLM behind Ray Serve, routing telemetry, attack probes. Built on moe_routing."""
