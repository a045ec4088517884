"""``GET /v1/models`` and ``GET /v1/models/{id}``: the served model and its aliases."""

from __future__ import annotations

from fastapi import APIRouter

from moeserve.server.http.deps import Runtime, RuntimeDep
from moeserve.server.http.errors import error_responses, model_not_found
from moeserve.server.http.responses import ModelCard, ModelList

router = APIRouter(tags=["models"], responses=error_responses(401, 404, 503))


def _card(runtime: Runtime, name: str) -> ModelCard:
    return ModelCard(
        id=name,
        created=runtime.created,
        root=runtime.model_id,
        context_length=runtime.max_model_len,
        max_model_len=runtime.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    """List the served model id followed by its aliases.

    Args:
        runtime: The server runtime.

    Returns:
        The model list.
    """
    return ModelList(data=[_card(runtime, n) for n in [runtime.model_id, *runtime.aliases]])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, runtime: RuntimeDep) -> ModelCard:
    """Describe one model by id or alias.

    Args:
        model_id: The id or alias.
        runtime: The server runtime.

    Returns:
        The model card.
    """
    runtime.check_model(model_id)
    if model_id not in (runtime.model_id, *runtime.aliases):
        raise model_not_found(model_id)
    return _card(runtime, model_id)
