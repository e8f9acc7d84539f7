"""Training loops: alignment (stage 1) and selective visual instruction tuning (stage 2)."""
