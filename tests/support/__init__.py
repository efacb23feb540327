"""Helpers shared by the test suites: throwaway databases, Redis, worker processes."""
