"""Compare xgrammar, llguidance and outlines-core on this machine's CPU for itt-server's
structured outputs: compile time, per-token mask time and correctness, on JSON schemas with the
default model's sentencepiece vocabulary (8192 pieces, byte fallback).

    python scripts/compare_grammar_libs.py [--walks 20]

Per schema and library:
- the tokens of a valid document (teacher forcing) are each allowed by the mask, in order, and
  the grammar accepts at the end (no false rejections);
- ``--walks`` random walks that pick uniformly among the allowed tokens, with EOS whenever the
  grammar allows it, for at most 400 tokens; every walk that ends must parse and validate
  (no false acceptances);
- the time of each mask computation (fill a bitmask for the next token) and of accepting the
  token.
Needs ``pip install xgrammar llguidance outlines-core jsonschema``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import jsonschema
import torch

from itt_runtime.checkpoints import DEFAULT_MODEL_DIR
from itt_runtime.tokenizers.tokenizer import Tokenizer

SCHEMAS: dict[str, tuple[dict, object]] = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"}}, "required": ["name", "age"],
        "additionalProperties": False},
        {"name": "Ann Lee", "age": 31}),
    "nested": ({"type": "object", "properties": {
        "title": {"type": "string"},
        "author": {"type": "object", "properties": {
            "first": {"type": "string"}, "last": {"type": "string"}},
            "required": ["first", "last"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "status": {"enum": ["draft", "published", "archived"]}},
        "required": ["title", "author", "tags", "rating", "status"],
        "additionalProperties": False},
        {"title": "On the Road", "author": {"first": "Jack", "last": "Kerouac"},
         "tags": ["travel", "novel"], "rating": 4.5, "status": "published"}),
}


def pieces_as_bytes(tok: Tokenizer) -> list[bytes]:
    """Each token's bytes as it continues a text: ▁ is a space, <0xNN> is that byte; control
    and unknown tokens are b"" (they never match)."""
    sp, out = tok.sp, []
    for i in range(tok.vocab_size):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            out.append(b"")
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr
        self.xgr = xgr
        vocab = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_FALLBACK,
                                 vocab_size=tok.vocab_size, stop_token_ids=[tok.eos_token_id],
                                 add_prefix_space=True)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
        self.V = tok.vocab_size

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def allowed(self, m) -> torch.Tensor:
        m.fill_next_token_bitmask(self.mask)
        logits = torch.zeros(1, self.V)
        self.xgr.apply_token_bitmask_inplace(logits, self.mask)
        return logits[0] == 0

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def done(self, m) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance
        import llguidance.torch as llt
        self.ll, self.llt = llguidance, llt
        sp = tok.sp

        class Wrapped:
            eos_token_id = tok.eos_token_id
            bos_token_id = tok.bos_token_id
            tokens = [b if b else b"\xff" + sp.id_to_piece(i).encode()
                      for i, b in enumerate(pieces_as_bytes(tok))]
            special_token_ids = [i for i in range(tok.vocab_size)
                                 if sp.is_control(i) or sp.is_unknown(i)]

            def __call__(self, s):
                # sentencepiece adds a "▁" in front of a text (its dummy prefix); a
                # continuation has none.
                text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
                ids = sp.encode("a" + text)
                first = sp.id_to_piece(ids[1]) if len(ids) > 1 else ""
                if sp.id_to_piece(ids[0]) == "\u2581a":
                    return ids[1:]
                if sp.id_to_piece(ids[0]) == "\u2581" and first.startswith("a"):
                    return sp.encode(first[1:]) [1:] + ids[2:] if first[1:] else ids[2:]
                return sp.encode(text)

        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()))
        self.mask = llt.allocate_token_bitmask(1, self.tok.vocab_size)
        self.V = tok.vocab_size

    def compile(self, schema: dict):
        return self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))

    def matcher(self, compiled):
        m = self.ll.LLMatcher(self.tok, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def allowed(self, m) -> torch.Tensor:
        self.llt.fill_next_token_bitmask(m, self.mask, 0)
        logits = torch.zeros(1, self.V)
        self.llt.apply_token_bitmask_inplace(logits, self.mask)
        return logits[0] == 0

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def done(self, m) -> bool:
        return m.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer) -> None:
        import outlines_core as oc
        self.oc = oc
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(pieces_as_bytes(tok)):
            if b:
                by_bytes.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_token_id, by_bytes)
        self.mask = torch.zeros(1, (tok.vocab_size + 31) // 32, dtype=torch.int32)
        self.V = tok.vocab_size
        self.eos = tok.eos_token_id

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def allowed(self, m) -> torch.Tensor:
        m.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)
        bits = (self.mask[0, :, None] >> torch.arange(32)) & 1
        return bits.flatten()[:self.V].bool()

    def accept(self, m, t: int) -> bool:
        try:
            m.advance(t)
        except ValueError:
            return False
        return True

    def done(self, m) -> bool:
        return m.is_finished()


def teacher_forced(lib, compiled, ids: list[int], eos: int) -> tuple[bool, list[float]]:
    m, times, ok = lib.matcher(compiled), [], True
    for t in ids + [eos]:
        t0 = time.perf_counter()
        allowed = lib.allowed(m)
        times.append(time.perf_counter() - t0)
        if not allowed[t] or not lib.accept(m, t):
            ok = False
            break
    return ok, times


def walk(lib, compiled, rng: random.Random, tok: Tokenizer, limit: int = 400):
    m, out, times = lib.matcher(compiled), [], []
    for _ in range(limit):
        t0 = time.perf_counter()
        allowed = lib.allowed(m)
        t1 = time.perf_counter()
        ids = allowed.nonzero().flatten().tolist()
        if not ids:
            return None, times, "empty mask"
        # Favour ending: EOS when allowed, else a closing token half of the time.
        if tok.eos_token_id in ids:
            return tok.decode(out), times, None
        closing = [i for i in ids if tok.id_to_piece(i) in ('"', "}", "]", ",", '",', "}", '"}')]
        t = rng.choice(closing if closing and rng.random() < 0.5 else ids)
        t2 = time.perf_counter()
        if not lib.accept(m, t):
            return None, times, "allowed token rejected"
        times.append((t1 - t0) + (time.perf_counter() - t2))
        out.append(t)
    return None, times, "too long"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--walks", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model")
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        t0 = time.perf_counter()
        lib = cls(tok)
        setup = time.perf_counter() - t0
        print(f"== {lib.name}: tokenizer setup {setup * 1e3:.0f} ms")
        for name, (schema, example) in SCHEMAS.items():
            t0 = time.perf_counter()
            compiled = lib.compile(schema)
            compile_s = time.perf_counter() - t0
            ids = tok.encode(json.dumps(example), add_bos=False)
            if tok.id_to_piece(ids[0]) == "\u2581":
                ids = ids[1:]
            forced_ok, forced_t = teacher_forced(lib, compiled, ids, tok.eos_token_id)
            rng = random.Random(0)
            valid = ended = 0
            walk_t: list[float] = []
            errors: dict[str, int] = {}
            for _ in range(args.walks):
                text, times, err = walk(lib, compiled, rng, tok)
                walk_t += times
                if err:
                    errors[err] = errors.get(err, 0) + 1
                    continue
                ended += 1
                try:
                    jsonschema.validate(json.loads(text), schema)
                    valid += 1
                except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                    errors["invalid: " + type(e).__name__] = errors.get(
                        "invalid: " + type(e).__name__, 0) + 1
            us = [t * 1e6 for t in forced_t + walk_t]
            print(f"  {name:7s} compile {compile_s * 1e3:7.1f} ms | mask+accept per token: "
                  f"median {statistics.median(us):6.0f} us, p99 "
                  f"{sorted(us)[int(len(us) * 0.99)]:6.0f} us, max {max(us):6.0f} us | "
                  f"valid doc accepted: {forced_ok} | walks ended {ended}/{args.walks}, "
                  f"valid {valid}/{ended} {errors or ''}")


if __name__ == "__main__":
    main()
