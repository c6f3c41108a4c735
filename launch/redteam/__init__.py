"""Red-team scans of models behind the gateway with outside tools (garak)."""
