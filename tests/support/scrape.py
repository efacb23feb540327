"""Scraping a /metrics endpoint in tests: free ports and the samples, parsed by prometheus_client's
own parser (what Prometheus reads is what the tests read)."""

from __future__ import annotations

import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_text(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name → {sorted label pairs → value}."""
    found: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[key] = sample.value
    return found


def value(found: dict[str, dict[Labels, float]], name: str, **labels: str) -> float | None:
    return found.get(name, {}).get(tuple(sorted(labels.items())))
