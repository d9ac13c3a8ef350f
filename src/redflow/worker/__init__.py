"""Worker process internals: claim loop, executor, settings."""
