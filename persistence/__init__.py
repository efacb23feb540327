"""tasklane's persistence: ORM models, repositories, unit of work and lifecycle statements."""
