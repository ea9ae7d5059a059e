"""vLLM's run-time LoRA routes, served where VLLM_ALLOW_RUNTIME_LORA_UPDATING is set (as vLLM
serves them): `POST /v1/load_lora_adapter` {"lora_name", "lora_path"} serves a PEFT adapter folder
under a new name, `POST /v1/unload_lora_adapter` {"lora_name"} stops serving one (requests running
with it finish first). Answers as vLLM's: a line of text on success, the OpenAI error envelope
otherwise."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import StrictStr

from engine.async_engine import EngineNotReadyError
from engine.lora.errors import AdapterError
from engine.lora.names import listed
from server.errors import APIError
from server.generation import refusal
from server.protocol import RequestBody

router = APIRouter()


class LoadLoRAAdapterRequest(RequestBody):
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRAAdapterRequest(RequestBody):
    lora_name: StrictStr
    lora_int_id: int | None = None  # (vLLM's; adapters are named here)


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
    state = request.app.state.skipserve
    name = body.lora_name.strip()
    if not name or not body.lora_path.strip():
        raise APIError(400, "both 'lora_name' and 'lora_path' must be given", "lora_name" if not name else "lora_path")
    if name in state.served_names:
        raise APIError(400, f"'{name}' is the model's own name; an adapter needs another", "lora_name")
    if not listed(name):  # (llama-server's --lora combinations are served under such names)
        raise APIError(400, "an adapter's name may not begin with a NUL character", "lora_name")
    try:
        await state.engine.load_adapter(name, body.lora_path)
    except EngineNotReadyError as exc:
        raise refusal(exc)
    except AdapterError as exc:
        raise APIError(400, str(exc), "lora_path" if "already been loaded" not in str(exc) else "lora_name")
    except ValueError as exc:  # LoRA not enabled
        raise APIError(400, str(exc))
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
    state = request.app.state.skipserve
    name = body.lora_name.strip()
    try:
        state.engine.unload_adapter(name)
    except EngineNotReadyError as exc:
        raise refusal(exc)
    except KeyError:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "model_not_found")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
