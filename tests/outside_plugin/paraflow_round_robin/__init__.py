"""A paraflow strategy plugin: images dealt round-robin over the ranks."""
