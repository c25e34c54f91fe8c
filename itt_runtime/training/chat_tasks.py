"""The arithmetic tasks as an instruct model is asked them: one user turn in the model's own
chat template ("What is 4821 + 397?"), the reply the bare answer ("5218") and the model's
end-of-turn token (issue 30: upcycling SmolLM2-135M-Instruct into a model that thinks).

The prompt is rendered and tokenized exactly as the server renders a chat request (the
model's template with its default system message, a generation prompt, no BOS added beyond
what the template writes), so that what is trained and evaluated here is what a
``/v1/chat/completions`` client gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from itt_runtime.tokenizers.chat_template import ChatTemplate, ChatTemplateError
from itt_runtime.tokenizers.tokenizer import Tokenizer
from itt_runtime.training.tasks import Problem, question


@dataclass(frozen=True)
class _Turn:
    role: str
    content: str

    def template_fields(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}


class ChatFormat:
    """A ``task_trainer.ProblemFormat``: the question as a chat request, the answer as the
    assistant's reply ending with the tokenizer's EOS (the end-of-turn token of an instruct
    model: SmolLM2's ``<|im_end|>``)."""
    name = "chat"

    def __init__(self, tok: Tokenizer, template: ChatTemplate | None = None) -> None:
        if tok.eos_token_id < 0:
            raise ValueError("the chat format needs a tokenizer with an EOS token")
        self.tok = tok
        self.template = template or ChatTemplate.for_model(tok)
        if self.template.source is None:
            raise ChatTemplateError("the chat format needs a model with a chat template "
                                    "(its tokenizer_config.json has none)")

    def prompt_text(self, problem: Problem) -> str:
        return self.template.render([_Turn("user", question(problem))])

    def prompt_ids(self, problem: Problem) -> list[int]:
        return self.question_ids(question(problem))

    def question_ids(self, text: str) -> list[int]:
        """Any question as one user turn, as the server renders and tokenizes it."""
        return self.tok.encode_prompt(self.template.render([_Turn("user", text)]),
                                      add_special_tokens=False)

    def answer_ids(self, problem: Problem) -> list[int]:
        return self.tok.encode(problem.answer, add_bos=False) + [self.tok.eos_token_id]
