"""The real itt-server with one injected fault, for fault-containment tests:

    python tests/server/faulty_server.py one|every  SERVER FLAGS…

``one``: the sampler raises for any batch holding a request with max_tokens == 13 (the
"poisoned" request); everything else is served normally. ``every``: the model runner raises
on every step, so the engine cannot run at all.
"""

from __future__ import annotations

import sys

from itt_runtime.engine import llm_engine as engine_module
from server.cli import main

POISON_MAX_TOKENS = 13


def inject(mode: str) -> None:
    real_init = engine_module.LLMEngine.__init__

    def init(self, config) -> None:
        real_init(self, config)
        if mode == "every":
            def execute(batch):
                raise RuntimeError("injected runner fault")
            self.runner.forward.execute = execute
            return
        sampler = self.runner.sampler

        def sample(logits, seqs, *rest):
            if any(s.params.max_tokens == POISON_MAX_TOKENS for s in seqs):
                raise RuntimeError("injected sampler fault: secret internal detail")
            return sampler(logits, seqs, *rest)
        self.runner.sampler = sample

    engine_module.LLMEngine.__init__ = init


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
