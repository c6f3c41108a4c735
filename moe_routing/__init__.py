"""The MoE routing core shared by alignment and serving: adapters, instrumentation, statistics, profiler."""
