"""The gateway: pipeline, CLI and (later) the network edges."""
