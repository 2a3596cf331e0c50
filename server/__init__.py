"""REST monitoring for a running snapstore."""

__all__: list[str] = []
