"""Export an itt-server checkpoint at think budget 0 as a Hugging Face ``LlamaForCausalLM``
directory, so that other servers (llama.cpp after its ``convert_hf_to_gguf.py``, vLLM,
transformers) can run the same weights with the same matmul shapes as itt-server at budget 0.

    python -m loadtest.export_llama OUT_DIR [--model default] [--dtype float32]

What is exported: the backbone only (embeddings, every layer's base block, final norm, LM head);
routers and the routed steps' encodings φ_1 … φ_{S−1} are dropped, since at budget 0 no token
is ever routed. An ITT layer's base step is ``y = x + φ_0 ⊙ Δ(x)``; φ_0 is folded into that
layer's o_proj and down_proj rows (``W ← diag(φ_0) W``), which keeps every matmul's shape.

**The export is exact for a dense checkpoint only.** For an ITT layer it is close but not
equal: φ_0 scales the whole residual branch ``Δ(x) = a + MLP(RMSNorm(x + a))``, so in the
ITT model the MLP sees ``x + a`` while in the exported LLaMA it sees ``x + φ_0 ⊙ a`` (see
ITT_SPEC, "Upcycling a dense model"). A LLaMA block cannot express the ITT one; the folded
export is the closest LLaMA with the same cost per token, which is what a speed comparison
needs. ``tests/loadtest/test_export_llama.py`` checks the dense case against transformers.

The tokenizer goes as it is: ``tokenizer.model`` (sentencepiece) with a ``LlamaTokenizer``
``tokenizer_config.json``, or ``tokenizer.json`` when the checkpoint has one.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from itt_runtime.checkpoints import resolve_model_path
from itt_runtime.config import ModelConfig
from itt_runtime.model.hf import to_hf_name
from itt_runtime.model.itt import ITTModel
from itt_runtime.model.loader import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """The checkpoint uses a feature this LLaMA export does not carry."""


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """The ``config.json`` of a LlamaForCausalLM with ``cfg``'s backbone."""
    unsupported = [name for name, on in (("qkv_bias", cfg.qkv_bias), ("o_bias", cfg.o_bias),
                                         ("sliding_window", cfg.sliding_window is not None),
                                         ("rope_scaling", cfg.rope_scaling is not None))
                   if on]
    if unsupported:
        raise ExportError(f"config.json: {', '.join(unsupported)} not supported by the LLaMA "
                          "export")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "torch_dtype": dtype,
    }


@torch.no_grad()
def hf_state_dict(model: ITTModel) -> dict[str, torch.Tensor]:
    """HF parameter names -> fp32 tensors, φ_0 folded into o_proj and down_proj."""
    out: dict[str, torch.Tensor] = {}
    for key, w in model.state_dict().items():
        name = to_hf_name(key)
        if name is None:                                   # φ, routers: folded or dropped
            continue
        m = re.fullmatch(r"layers\.(\d+)\.block\.(o_proj|down_proj)\.weight", key)
        layer = model.itt_layer_list[int(m.group(1))] if m else None
        if layer is not None and layer.think_steps > 1:
            w = layer.phi[0][:, None] * w                  # (d, in): scale output rows
        out[name] = w
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export(model_dir: str | Path | None, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the LLaMA directory; returns it."""
    src = resolve_model_path(model_dir)
    model, _ = load_model(src)
    cfg = model.cfg
    config = hf_config(cfg, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2) + "\n")
    tok_config: dict = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = json.loads((src / "tokenizer_config.json").read_text())
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    if (src / "tokenizer.model").is_file():
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        tok_config.setdefault("tokenizer_class", "LlamaTokenizer")
    tok_config.setdefault("add_bos_token", True)
    tok_config.setdefault("add_eos_token", False)
    tok_config.setdefault("model_max_length", cfg.max_position_embeddings)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.export_llama", description=__doc__
                                .split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out_dir", help="directory to write (created)")
    p.add_argument("--model", default="default", help="itt-server model directory or name")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    try:
        out = export(args.model, args.out_dir, args.dtype)
    except (ExportError, ValueError) as e:
        print(f"export_llama: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
