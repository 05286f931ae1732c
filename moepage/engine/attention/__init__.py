"""Token mixers: one module per attention kind, each with its resident weight names and per-sequence state."""
