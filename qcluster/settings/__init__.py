"""Settings: the config model, parsed and validated once at the edge."""
