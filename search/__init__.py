"""The design-exploration loop: space, requirements, strategies, fidelity, trial store."""
