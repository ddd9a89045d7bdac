"""AuraFlow as a paraflow model family: family.py (what paraflow asks of a family), model.py
(a tiny AuraFlow pipeline built from config, and its config)."""
