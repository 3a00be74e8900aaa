"""Control side: HTTP API, router, pools and the operator CLI. Never imports torch or engine code."""
