"""Dependency-free helpers both sides share (the orchestrator may import this package and the
generated stubs, nothing else of `services`): picking the least loaded, chained block hashes, the
decode-first metadata, processes and signals, logging, typer glue."""
