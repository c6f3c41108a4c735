"""MESA alignment job: profile, allocate (optimal transport), train, export. Built on moe_routing."""
