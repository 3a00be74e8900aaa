"""The worker instances this orchestrator knows: their states, health and load, circuit breakers,
the membership backends that add and remove them, the autoscaler, and the streams it keeps open to
them (first tokens, KV events)."""
