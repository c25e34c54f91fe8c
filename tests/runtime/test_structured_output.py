"""Structured outputs in the engine: the sampler masks each grammar row and leaves the others
alone, the grammar state advances as tokens are appended, a completed grammar stops the
sequence, and grammars batch with unconstrained requests without changing either."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("xgrammar")

from itt_runtime.engine.sequence import Sequence  # noqa: E402
from itt_runtime.llm import LLM  # noqa: E402
from itt_runtime.sampling.sampler import Sampler  # noqa: E402
from itt_runtime.sampling.structured_output import GrammarCompiler, GrammarError, GrammarSpec  # noqa: E402
from itt_runtime.sampling_params import ParamError, SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "n": {"type": "integer", "minimum": 0, "maximum": 9},
    "ok": {"type": "boolean"}}, "required": ["name", "n", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def compiler(llm):
    return GrammarCompiler(llm.tokenizer, llm.engine.model_config.vocab_size)


def seq(params: SamplingParams, i: int = 0) -> Sequence:
    return Sequence(f"s{i}", f"s{i}", 0, [1, 5, 6], params, 0.0, [])


def test_sampler_masks_grammar_rows_only(compiler, llm):
    tok = llm.tokenizer
    grammar = compiler.compile(GrammarSpec("regex", "yes|no"))
    V = llm.engine.model_config.vocab_size
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    seqs = [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=0,
                                                                   grammar=grammar), 1),
            seq(SamplingParams(temperature=0), 2)]
    tokens, _ = Sampler(tok.eos_token_id)(logits, seqs)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert tok.decode([int(tokens[1])]).strip()[:1] in ("y", "n")


def test_compiler_caches_by_spec_and_names_errors(compiler):
    a = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    assert compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))) is a
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("regex", "(unclosed"))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("grammar", "root ::= undefined_rule"))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("choice", "[]"))
    with pytest.raises(ParamError) as e:
        SamplingParams(min_tokens=2, grammar=a)
    assert e.value.param == "min_tokens"


def test_sampled_outputs_follow_the_grammar_and_stop(llm, compiler):
    jsonschema = pytest.importorskip("jsonschema")
    schema = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    outs = llm.generate(["A record:"] * 6, [SamplingParams(temperature=1.0, max_tokens=120,
                                                           seed=s, grammar=schema)
                                            for s in range(6)])
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)
    regex = compiler.compile(GrammarSpec("regex", r"[a-z]{2,5}-[0-9]{3}"))
    for out in llm.generate(["Code:"] * 4, [SamplingParams(temperature=1.0, max_tokens=40,
                                                          seed=s, grammar=regex)
                                           for s in range(4)]):
        assert re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", out.outputs[0].text.strip())
        assert out.outputs[0].finish_reason == "stop"


def test_max_tokens_inside_the_structure_is_length(llm, compiler):
    schema = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    (out,) = llm.generate(["A record:"], SamplingParams(temperature=0, max_tokens=3,
                                                        grammar=schema))
    assert out.outputs[0].finish_reason == "length"


def test_mixed_batch_gives_each_greedy_request_its_output_alone(llm, compiler):
    choice = compiler.compile(GrammarSpec("choice", json.dumps(["red", "green", "blue"])))
    schema = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=60, grammar=schema),
              SamplingParams(temperature=0, max_tokens=20, grammar=choice),
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, think_budget=1.0)]
    prompts = ["And God said", "A record:", "Colour:", "In the beginning"]
    alone = [llm.generate([p], q)[0].outputs[0] for p, q in zip(prompts, params)]
    batch = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert batch[2].text.strip() in ("red", "green", "blue")


def test_grammar_masks_are_computed_during_the_step_and_used(compiler, llm):
    """The runner hands the sampler each grammar row's mask, computed on its worker thread
    while the forward ran; the output is what the sampler computing it itself gives."""
    grammar = compiler.compile(GrammarSpec("regex", "(yes|no)!"))
    runner = llm.engine.runner
    real, seen = runner.sampler, []

    def spy(logits, seqs, grammar_masks=None):
        seen.append(grammar_masks)
        return real(logits, seqs, grammar_masks)
    runner.sampler = spy
    try:
        out = llm.generate(["Answer:"], SamplingParams(max_tokens=8, temperature=0,
                                                       grammar=grammar))
    finally:
        runner.sampler = real
    assert out[0].outputs[0].text in ("yes!", "no!")
    assert seen and all(m is not None and len(m) == 1 for m in seen)
    alone = LLM(str(llm.engine.model_path)).generate(
        ["Answer:"], SamplingParams(max_tokens=8, temperature=0, grammar=grammar))
    assert alone[0].outputs[0].text == out[0].outputs[0].text
