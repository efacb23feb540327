"""This service's own `worker` module, which has nothing to do with tasklane.

Before tasklane installed everything under the one name `tasklane`, a module like this on
PYTHONPATH hid tasklane's own `worker` package and `tasklane worker` could not even start.
"""


def shout(text: str) -> str:
    return f"{text.upper()}!"
