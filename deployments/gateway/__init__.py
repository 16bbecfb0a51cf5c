"""The HTTP edge: routes, admission (auth, limits, audit), relay to replicas, API formats."""
