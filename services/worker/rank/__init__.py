"""What every rank of an instance runs: the calls its DP controller hands it, around the engine
loop; its requests' output streams, its prefix-cache event log, and (decode) the KVHandoff client."""
