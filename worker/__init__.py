"""tasklane worker: arq jobs, agents, producer client, reconciler and CLI."""
