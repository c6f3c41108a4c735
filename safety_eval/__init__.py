"""Safety evaluation: data, refusal judging and metrics for MoE safety experiments."""
