"""tasklane's domain: entities, value objects, repository interfaces and errors (stdlib only)."""
