"""Flow-matching transport and samplers (stage 2)."""
