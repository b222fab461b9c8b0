"""Use cases: one function per user verb. The CLI and (later) the Docker driver call these."""
