"""Pure formats: MIME with limits, the S/MIME profile, hardened XML and payload models.

Nothing in this package opens sockets, files or databases, or reads the clock.
"""
