"""An application's agents, served by workers built from examples/derived-image/Dockerfile."""
