"""`tasklane web`: the dashboard (needs the `web` extra: `pip install 'tasklane[web]'`)."""
