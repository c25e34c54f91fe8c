from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import __version__
from server.responses import ModelCard, ModelList
from server.state import state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine loop runs; 503 when it died or the server is draining."""
    s = state(request)
    if s.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not s.client.is_alive:
        return JSONResponse({"status": "engine dead"}, status_code=503)
    return Response(status_code=200)


@router.get("/version")
async def version() -> dict:
    return {"version": __version__}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    s = state(request)
    c, mc = s.client, s.client.model_config
    itt = {"n_layers": mc.n_layers, "itt_layers": list(mc.itt_layers),
           "think_steps": mc.think_steps, "max_extra_steps": mc.max_extra_steps,
           "default_think_budget": c.info.default_think_budget}
    cards = [ModelCard(id=name, root=str(c.info.model_path),
                       max_model_len=c.max_model_len, itt=itt)
             for name in s.settings.served_model_names]
    return ModelList(data=cards).model_dump(mode="json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
