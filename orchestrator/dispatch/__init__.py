"""Getting a request's tokens from the workers: a lease on a (prefill, decode) pair from the router
and its policies, one attempt on that pair, retries and migrations across pairs."""
