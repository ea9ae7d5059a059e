"""The names adapters are served under besides those given (no torch here: the server reads them)."""
from __future__ import annotations

# the name of llama-server's --lora adapters, applied together to requests that name the model itself
# (no name a request or --lora-modules can give: those are never empty)
DEFAULT_ADAPTER = ""
SCALED_PREFIX = "\x00lora:"  # names of those adapters combined at a request's own scales (`scaled_name`)
MAX_LORA_SCALE = 100.0  # their scales' bound (a guard against scales that swamp the activations)


def scaled_name(scales: list[float]) -> str:
    """The name llama-server's --lora adapters combined at `scales` are served under (for requests that
    ask for scales of their own; a name no request or flag can give)."""
    return SCALED_PREFIX + ",".join(repr(float(s)) for s in scales)


def listed(name: str) -> bool:
    """Whether an adapter is one of those served by name (--lora-modules, loaded at run time), not one
    of llama-server's --lora combinations."""
    return name != DEFAULT_ADAPTER and not name.startswith(SCALED_PREFIX)
