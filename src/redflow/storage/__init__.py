"""Storage layer: key names, Lua transitions and their typed wrappers."""
