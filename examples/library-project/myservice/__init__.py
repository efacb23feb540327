"""A service built on tasklane (see pyproject.toml beside)."""
