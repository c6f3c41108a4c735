"""The model organism: a tiny MoE with measurable safety sparsity, built locally."""
