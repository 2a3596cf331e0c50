"""What training code calls: the snapstore client and adapters."""

__all__: list[str] = []
