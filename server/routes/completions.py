from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.openapi import error_responses, json_body
from server.protocol import CompletionRequest, parse_body
from server.state import state

router = APIRouter()


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest),
             responses=error_responses())
async def create_completion(request: Request) -> Response:
    req = await parse_body(request, CompletionRequest)
    return await state(request).completions.create(req, request)
