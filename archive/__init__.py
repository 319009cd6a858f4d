"""The tamper-evident audit archive."""
