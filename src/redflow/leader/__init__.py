"""Duties of the elected leader."""
