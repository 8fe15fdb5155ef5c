"""Runtime services: configuration and its typed schema, checkpoints, run folders, distributed helpers, logging and errors."""
