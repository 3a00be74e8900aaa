"""Worker processes: the engine behind SGLang's scheduler gRPC protocol, and the KV hand-off."""
