"""vLLM's tokenizer endpoints, in the shapes lm-evaluation-harness's remote tokenizer reads."""

from fastapi import APIRouter, Request

from server.chat import render
from server.errors import bad_request
from server.generation import check_model
from server.openapi import error_responses, json_body
from server.protocol import DetokenizeRequest, TokenizeRequest, parse_body
from server.state import state
from server.tokens import check_size, encode

router = APIRouter()


@router.post("/tokenize", openapi_extra=json_body(TokenizeRequest),
             responses=error_responses())
async def tokenize(request: Request) -> dict:
    s = state(request)
    req = await parse_body(request, TokenizeRequest)
    check_model(req.model, list(s.settings.served_model_names))
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if req.prompt is not None:
        text = req.prompt
    else:
        assert req.messages is not None
        text = render(s.chat.template, req.messages, req.add_generation_prompt)
    tok = s.client.tokenizer
    check_size(tok, text, s.client.max_model_len, "prompt" if req.prompt is not None
               else "messages")
    add_special_tokens = req.add_special_tokens if req.add_special_tokens is not None \
        else req.prompt is not None
    ids = encode(tok, text, add_special_tokens)
    return {"count": len(ids), "max_model_len": s.client.max_model_len, "tokens": ids,
            "token_strs": [tok.id_to_piece(i) for i in ids] if req.return_token_strs else None}


@router.post("/detokenize", openapi_extra=json_body(DetokenizeRequest),
             responses=error_responses())
async def detokenize(request: Request) -> dict:
    s = state(request)
    req = await parse_body(request, DetokenizeRequest)
    check_model(req.model, list(s.settings.served_model_names))
    tok = s.client.tokenizer
    if any(not 0 <= t < tok.vocab_size for t in req.tokens):
        raise bad_request(f"token ids must be in [0, {tok.vocab_size})", "tokens")
    return {"prompt": tok.decode(req.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    s = state(request)
    tok = s.client.tokenizer
    return {"tokenizer_class": tok.kind, "vocab_size": tok.vocab_size,
            "bos_token": tok.bos_token, "bos_token_id": _id(tok.bos_token_id),
            "eos_token": tok.eos_token, "eos_token_id": _id(tok.eos_token_id),
            "pad_token": tok.config_token("pad_token"), "add_bos_token": tok.add_bos_token,
            "model_max_length": s.client.max_model_len,
            "chat_template": s.chat.template.source}


def _id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None
