"""Sharing states: the wire format, graph walks, transports (hub, S3) and the hub."""
