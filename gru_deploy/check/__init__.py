"""Proving the graphs compute what PyTorch computes: runners, tolerances, the parity grid, accuracy, JUnit reports."""
