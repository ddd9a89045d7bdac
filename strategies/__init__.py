"""Strategy plugins: each maps the pipeline's stages onto the ranks. Found through the entry-point
group `paraflow.strategies` (see pyproject.toml), so an outside package adds one the same way."""
