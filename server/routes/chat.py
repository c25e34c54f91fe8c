from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.openapi import error_responses, json_body
from server.protocol import ChatCompletionRequest, parse_body
from server.state import state

router = APIRouter()


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest),
             responses=error_responses())
async def create_chat_completion(request: Request) -> Response:
    req = await parse_body(request, ChatCompletionRequest)
    return await state(request).chat.create(req, request)
