"""What the load test sends: prompt and output length distributions, the think-budget mix, and
the stream of request specs built from them (deterministic for a seed). Two workloads exercise
prefix caching: a shared prefix (every prompt = one common random prefix + its own suffix, like
a chat system prompt or few-shot examples) and multi-turn conversations (each turn re-sends the
whole history, the previous answers included, plus a new user message)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

# Common English words: prompts made of them tokenize at roughly one token per word with any
# English tokenizer. Lengths are therefore approximate; the real prompt token counts are taken
# from the server's `usage` in the results.
WORDS = (
    "the of and to in is was that for it with as his on be at by had not are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year"
).split()


@dataclass(frozen=True)
class LengthDist:
    """A length distribution, parsed from a spec string:
    ``"128"`` (fixed), ``"uniform:64:256"`` (inclusive), ``"normal:128:32"`` (mean, std; clipped
    to >= 1) or ``"exp:128"`` (exponential with that mean, >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        parts = spec.split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            kind, *nums = parts
            need = {"uniform": 2, "normal": 2, "exp": 1}
            if kind not in need or len(nums) != need[kind]:
                raise ValueError
            dist = cls(kind, *(float(n) for n in nums))
        except ValueError:
            raise ValueError(f"bad length spec {spec!r}: use N, uniform:A:B, normal:MEAN:STD "
                             "or exp:MEAN") from None
        if dist.kind == "uniform" and not 1 <= dist.a <= dist.b:
            raise ValueError(f"bad length spec {spec!r}: need 1 <= A <= B")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            n = self.a
        elif self.kind == "uniform":
            n = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            n = rng.gauss(self.a, self.b)
        else:
            n = rng.expovariate(1.0 / self.a)
        return max(1, int(round(n)))


@dataclass(frozen=True)
class BudgetMix:
    """Think budgets requests draw from, with weights: ``"0,0.5,1"`` (equal weights),
    ``"0:1,0.5:2,1:1"`` (weighted) or ``"default"`` (send no think_budget: the server's
    default). ``None`` in ``budgets`` stands for the server's default."""

    budgets: tuple[float | None, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> BudgetMix:
        budgets, weights = [], []
        for item in spec.split(","):
            value, _, weight = item.strip().partition(":")
            b = None if value == "default" else float(value)
            if b is not None and not 0.0 <= b <= 1.0:
                raise ValueError(f"think budget {b} is outside [0, 1]")
            budgets.append(b)
            weights.append(float(weight) if weight else 1.0)
        return cls(tuple(budgets), tuple(weights))

    def sample(self, rng: random.Random) -> float | None:
        return rng.choices(self.budgets, weights=self.weights)[0]

    def single(self) -> list[BudgetMix]:
        """One mix per budget, for sweeping budgets one at a time."""
        return [BudgetMix((b,), (1.0,)) for b in self.budgets]


def budget_key(budget: float | None) -> str:
    """How a budget is named in results (JSON keys must be strings)."""
    return "default" if budget is None else f"{budget:g}"


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str                       # the completions prompt (and the chat user message)
    max_tokens: int
    think_budget: float | None
    # Chat messages to send instead of one user message with ``prompt`` (multi-turn).
    messages: tuple[dict[str, str], ...] | None = None
    stop: tuple[str, ...] = ()


def random_text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choices(WORDS, k=num_words))


def shared_prefix(num_words: int, seed: int) -> str:
    """The common prefix of a shared-prefix workload: ``num_words`` random words, the same for
    every request (and every sweep point) of a run with this seed; "" for 0 words."""
    return random_text(random.Random(f"shared-prefix-{seed}"), num_words) if num_words else ""


def request_stream(prompt_len: LengthDist, output_len: LengthDist, budgets: BudgetMix,
                   seed: int, limit: int | None = None,
                   prefix: str = "") -> Iterator[RequestSpec]:
    """Request specs, ``limit`` of them or endlessly; the same seed gives the same stream.
    With a ``prefix``, every prompt is the prefix, a space, then ``prompt_len`` random words."""
    rng = random.Random(seed)
    for i in itertools.count() if limit is None else range(limit):
        words = random_text(rng, prompt_len.sample(rng))
        prompt = f"{prefix} {words}" if prefix else words
        yield RequestSpec(i, prompt, output_len.sample(rng), budgets.sample(rng))


# The server's chat template (itt_runtime/tokenizers/chat_template.py), so that a completions
# conversation is the same text the chat endpoint would build.
USER, ASSISTANT, END_OF_TURN = "User: ", "Assistant:", "\nUser:"


@dataclass
class Conversation:
    """One multi-turn conversation: its user messages (one per turn) and, as the turns run,
    the answers. Turn ``t`` re-sends the system prefix, every earlier message and answer, and
    user message ``t``; as completions, the prompt of turn ``t`` is exactly the prompt of turn
    ``t - 1`` + its answer + the new message (so the previous prompt is a prefix of it)."""

    index: int
    user_messages: list[str]
    max_tokens: list[int]
    think_budget: float | None
    system: str = ""
    answers: list[str] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.user_messages)

    def turn(self, t: int, request_index: int) -> RequestSpec:
        """The request of turn ``t`` (needs the answers of turns 0 … t-1)."""
        if len(self.answers) < t:
            raise ValueError(f"turn {t} needs the answers of the {t} turns before it")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        prompt = f"{self.system}\n\n" if self.system else ""
        for k in range(t + 1):
            user = self.user_messages[k]
            messages.append({"role": "user", "content": user})
            prompt += f"{USER}{user}\n{ASSISTANT}"
            if k < t:
                answer = self.answers[k]
                messages.append({"role": "assistant", "content": answer.strip()})
                prompt += answer + "\n"
        return RequestSpec(request_index, prompt, self.max_tokens[t], self.think_budget,
                           messages=tuple(messages), stop=(END_OF_TURN,))


def conversation_stream(turns: int, prompt_len: LengthDist, output_len: LengthDist,
                        budgets: BudgetMix, seed: int, limit: int | None = None,
                        prefix: str = "") -> Iterator[Conversation]:
    """Conversations of ``turns`` turns, ``limit`` of them or endlessly: each user message is
    ``prompt_len`` random words, each answer at most ``output_len`` tokens, one think budget
    per conversation; ``prefix`` (if any) is the system message of every conversation."""
    if turns < 1:
        raise ValueError(f"a conversation needs at least one turn, got {turns}")
    rng = random.Random(seed)
    for i in itertools.count() if limit is None else range(limit):
        users = [random_text(rng, prompt_len.sample(rng)) for _ in range(turns)]
        outs = [output_len.sample(rng) for _ in range(turns)]
        yield Conversation(i, users, outs, budgets.sample(rng), prefix)
