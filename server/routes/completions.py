from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.protocol import CompletionRequest, parse_body
from server.state import state

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    req = await parse_body(request, CompletionRequest)
    return await state(request).completions.create(req, request)
