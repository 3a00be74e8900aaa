"""moeserve's worker side: engine, models, expert parallelism, KV hand-off, worker processes."""
