"""Mesh, sharding rules, train state, train steps, checkpoints."""
