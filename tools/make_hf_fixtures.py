#!/usr/bin/env python3
"""Hugging Face import/export fixtures: tests/fixtures/hf/<family>/ (tests/test_convert_hf.cpp).

Needs torch and transformers (not in CI; CI reads the committed fixtures):

    /tmp/hfvenv/bin/python tools/make_hf_fixtures.py                    # (re)write the fixtures
    /tmp/hfvenv/bin/python tools/make_hf_fixtures.py --roundtrip build/lmforge

Each family is a tiny random model saved with transformers' save_pretrained, so the files are exactly
what a user downloads:
  gpt2        GPT2LMHeadModel, tied head, fp32
  llama       LlamaForCausalLM, GQA 4/2, untied head, rope_theta 5e5, fp32, sharded (index.json),
              a byte-level BPE tokenizer.json and a chat template in tokenizer_config.json
  qwen2       Qwen2ForCausalLM, QKV bias, tied head, rope_theta 1e6, bf16, a tokenizer.json (258 ids of
              the 272) and chat_template.jinja
  mixtral     MixtralForCausalLM, 4 experts top-2, fp16
  qwen2_moe   Qwen2MoeForCausalLM, 3 layers (layer 0 dense: mlp_only_layers), 4 experts top-2 without
              renormalisation, a shared expert of twice the experts' width with its sigmoid gate
and reference.safetensors beside them: "tokens" I32 (B, T) and "logits" F32 (B, T, vocab), the model's
fp32 forward (eager attention) on the weights as saved (a bf16/fp16 family: its rounded weights).

--roundtrip BIN: for each family, `BIN import` then `BIN export --to hf`, loads the export with
transformers' matching class and compares its logits on the same tokens with the reference (max
|diff| / max |ref| <= 1e-4) and, where the family has a tokenizer, the exported tokenizer's ids and
chat template with the original's; prints one line per family and exits non-zero on a failure.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers as tf
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
B, T = 2, 12
SEED = 1234

TEXT = "In the beginning God created the heaven and the earth. 1234 \u00fc\u4e2d  \n\tend"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def families():
    """name -> (config, save dtype, save_pretrained kwargs, model class)"""
    return {
        "gpt2": (tf.GPT2Config(vocab_size=211, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                               layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0),
                 torch.float32, {}, tf.GPT2LMHeadModel),
        "llama": (tf.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                                 bos_token_id=0, eos_token_id=1),
                  torch.float32, {"max_shard_size": "40KB"}, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config(vocab_size=272, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
                  torch.bfloat16, {}, tf.Qwen2ForCausalLM),
        "mixtral": (tf.MixtralConfig(vocab_size=120, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                                     rope_theta=1000000.0, router_aux_loss_coef=0.02, tie_word_embeddings=False),
                    torch.float16, {}, tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig(vocab_size=130, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                                        mlp_only_layers=[0], rms_norm_eps=1e-6, rope_theta=10000.0,
                                        tie_word_embeddings=False),
                      torch.float32, {}, tf.Qwen2MoeForCausalLM),
    }


def randomise(model, gen):
    """Weights of a visible scale (std 0.2; norm gains 1 + 0.1 N(0, 1)), so that the logits are not
    all near zero and the routers have no ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if "norm" in name or "ln_" in name else 0.2 * noise)


def load_fp32(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens.long()).logits.float()


def write_tokenizer(path, vocab_size, chat_template_in_config):
    """A byte-level BPE trained on a few lines, with the chat template beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["In the beginning God created the heaven and the earth.",
            "And the earth was without form, and void; and darkness was upon the face of the deep."] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    if chat_template_in_config:
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                       "chat_template": CHAT_TEMPLATE}, f, indent=2)
    else:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)


def make(name, cfg, dtype, save_kwargs, cls):
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    gen = torch.Generator().manual_seed(SEED + len(name))
    model = cls(cfg)
    randomise(model, gen)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    if name == "llama":
        write_tokenizer(path, cfg.vocab_size, True)
    if name == "qwen2":
        write_tokenizer(path, 256 + 2, False)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen, dtype=torch.int32)
    logits = logits_of(load_fp32(cls, path), tokens)
    save_file({"tokens": tokens.contiguous(), "logits": logits.contiguous()}, os.path.join(path, "reference.safetensors"))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"{name}: {cls.__name__} {dtype} -> {path} ({size // 1024} KiB: {', '.join(sorted(os.listdir(path)))})")


def roundtrip(binary):
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, dtype, kw, cls) in families().items():
            src = os.path.join(OUT, name)
            ckpt, hf = os.path.join(tmp, name + "_ckpt"), os.path.join(tmp, name + "_hf")
            for args in (["import", "--from", src, "--out", ckpt], ["export", "--to", "hf", "--checkpoint", ckpt, "--out", hf]):
                r = subprocess.run([binary] + args, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"{name}: lmforge {args[0]} failed: {r.stderr.strip()}")
                    ok = False
                    break
            else:
                ref = load_file(os.path.join(src, "reference.safetensors"))
                model = tf.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
                got = logits_of(model.eval(), ref["tokens"])
                err = ((got - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
                good = type(model) is cls and err <= 1e-4
                tok = ""
                if os.path.exists(os.path.join(src, "tokenizer.json")):  # the exported tokenizer and template
                    a, b = tf.AutoTokenizer.from_pretrained(src), tf.AutoTokenizer.from_pretrained(hf)
                    chat = [{"role": "user", "content": "Hello, world! 123"}]
                    same = (a(TEXT)["input_ids"] == b(TEXT)["input_ids"] and
                            a.apply_chat_template(chat, tokenize=False) == b.apply_chat_template(chat, tokenize=False))
                    good = good and same
                    tok = f"; tokenizer and chat template {'the same' if same else 'DIFFER'}"
                ok = ok and good
                print(f"{name}: exported -> {type(model).__name__}, logits max|diff|/max|ref| = {err:.2e}{tok} "
                      f"{'ok' if good else 'FAIL'}; files: {', '.join(sorted(os.listdir(hf)))}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--roundtrip", metavar="LMFORGE", help="check export -> transformers with this lmforge binary")
    a = ap.parse_args()
    torch.manual_seed(SEED)
    if a.roundtrip:
        sys.exit(0 if roundtrip(a.roundtrip) else 1)
    os.makedirs(OUT, exist_ok=True)
    for name, spec in families().items():
        make(name, *spec)


if __name__ == "__main__":
    main()
