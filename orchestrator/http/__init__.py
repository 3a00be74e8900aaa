"""The HTTP edge: OpenAI routes, bodies and their checks, tokens in and text out, admission, rate
limits, and the JSON and SSE responses."""
