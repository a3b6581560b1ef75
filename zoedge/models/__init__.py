"""Source models: registry names, tiny random configs for tests, or a local path."""
