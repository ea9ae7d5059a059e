"""What the LoRA code raises for an adapter it will not serve: importable without torch (the HTTP
server names it in its answers, and server/ imports no torch)."""


class AdapterError(ValueError):
    """An adapter that cannot be served on this model, with the reason."""
