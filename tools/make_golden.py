"""Make the golden fixtures under tests/fixtures/ with Hugging Face transformers.

Developers run this by hand when a fixture has to change; CI never does (it needs torch, and
rawpaged and its tests never import torch). Every fixture is a tiny random float32 model saved
as a Hugging Face directory, plus `reference.npz` with logits and greedy tokens from transformers.

How to run it (from the repo root):

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 transformers safetensors tokenizers numpy
    /tmp/torchvenv/bin/python tools/make_golden.py                 # every fixture
    /tmp/torchvenv/bin/python tools/make_golden.py llama-gqa       # just the named ones
    /tmp/torchvenv/bin/python tools/make_golden.py --out /tmp/fx   # somewhere else

The output is deterministic (fixed seeds, fixed zip timestamps): a rerun with the same torch and
transformers versions rewrites identical files. tests/fixtures/README.md describes the format.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer, DynamicCache

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"

VOCAB_SIZE = 320
PROMPT_LENS = (5, 11, 17, 3)  # tokens per prompt, BOS included; one prompt runs alone per forward
DECODE_STEPS = 16  # greedy tokens per prompt; EOS does not stop it
MIN_LOGIT_GAP = 1e-2  # top-1 minus top-2 logit at every greedy step, else try the next seed
MIN_DISTINCT_GREEDY = 4  # distinct tokens in each prompt's greedy run, else try the next seed
MAX_SEED_TRIES = 50

# NOTE: the tokenizer is trained on this text only so that tokenizer.json is a real byte-level BPE
# with exactly VOCAB_SIZE entries; the random models know nothing about it.
CORPUS = """\
Once upon a time there was a little paged cache. It kept the keys and the values of every token
in small blocks of the same size, and a table told each sequence where its blocks were.
When two sequences shared a prompt they shared its blocks, and a block was copied only when one
of them wrote to it. The scheduler looked at the waiting queue, the running queue and the swapped
queue, and at every step it chose which requests would run. When memory ran out it preempted the
request that came last: it swapped its blocks to the host, or it threw them away and recomputed
them later. The model read the blocks through the table, one query at a time, and wrote the new
keys and values into free slots. The sampler chose the next token, greedy or at random, and the
engine checked the stop strings and streamed the text back to the user.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828
def main():\n    print("hello")\n    return 0\n
{"role": "user", "content": "Tell me a story about a dragon and a knight."}
The dragon said: "I am not afraid of you." The knight said nothing and sat down by the fire.
"""

# NOTE: two chat templates in the usual Hugging Face style, so that both idioms get exercised:
# LLaMA-2 style (bos_token in the template, system prompt folded into the first user turn,
# raise_exception on bad roles) and Zephyr style (add_generation_prompt).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
ZEPHYR_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class Fixture:
    """One fixture: a model config, its tokenizer's special tokens and how it is saved."""

    name: str
    family: str  # transformers' model_type: "llama", "opt", "mistral", "qwen2", "gpt2", ...
    config: dict
    seed: int
    sharded: bool = False  # two safetensors shards + model.safetensors.index.json
    chat_template: str | None = None
    # NOTE: ids follow the real families: LLaMA <unk>=0 <s>=1 </s>=2; OPT <s>=0 <pad>=1 </s>=2
    # <unk>=3, and OPT's BOS *and* EOS are both "</s>" (id 2).
    special_tokens: list[str] = field(default_factory=list)
    bos_token: str = ""
    eos_token: str = ""
    extra_tokenizer_config: dict = field(default_factory=dict)
    add_bos: bool = True  # the tokenizer prepends BOS (LLaMA, OPT); GPT-2 / NeoX tokenizers do not
    # config changes that must change the references (the feature the fixture exists for is used):
    # e.g. {"sliding_window": None}; checked on the longest prompt plus its greedy tokens
    contrast: dict | None = None
    # NOTE: dynamic NTK RoPE depends on the length of each forward call; the reference then runs
    # token by token through transformers' KV cache (what generate() does), see compute_reference
    incremental: bool = False
    config_rewrite: str | None = None  # "legacy" (transformers 4.x keys) or "neox-legacy"

    @property
    def first_plain_id(self) -> int:
        return len(self.special_tokens)


def llama_special() -> dict:
    return dict(special_tokens=["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>")


def opt_special() -> dict:
    return dict(special_tokens=["<s>", "<pad>", "</s>", "<unk>"], bos_token="</s>", eos_token="</s>")


FIXTURES = [
    Fixture(
        name="llama-gqa",
        family="llama",
        config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
            rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2,
        ),
        seed=1000,
        sharded=True,
        chat_template=LLAMA2_CHAT_TEMPLATE,
        extra_tokenizer_config=dict(unk_token="<unk>"),
        **llama_special(),
    ),
    Fixture(
        name="llama-mqa-tied",
        family="llama",
        config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
            rope_theta=50000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2,
        ),
        seed=2000,
        config_rewrite="legacy",
        chat_template=ZEPHYR_CHAT_TEMPLATE,
        extra_tokenizer_config=dict(unk_token="<unk>"),
        **llama_special(),
    ),
    Fixture(
        name="opt-preln",
        family="opt",
        config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=80, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=True,
            word_embed_proj_dim=64, bos_token_id=2, eos_token_id=2, pad_token_id=1,
        ),
        seed=3000,
        extra_tokenizer_config=dict(unk_token="</s>", pad_token="<pad>"),
        **opt_special(),
    ),
    Fixture(
        name="opt-postln-proj",
        family="opt",
        config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=80, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, do_layer_norm_before=False,
            word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2, pad_token_id=1,
        ),
        seed=4000,
        extra_tokenizer_config=dict(unk_token="</s>", pad_token="<pad>"),
        **opt_special(),
    ),
]



def gpt_special() -> dict:
    # NOTE: GPT-2 and Pythia have one special token, <|endoftext|>, BOS = EOS, and never prepend it.
    return dict(special_tokens=["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                add_bos=False)


# Small shapes for the families added with the issue-14 models (hidden 32 or 64, 2 layers).
SMALL = dict(vocab_size=VOCAB_SIZE, num_hidden_layers=2, bos_token_id=1, eos_token_id=2)
NO_ROPE_SCALING = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}

FIXTURES += [
    Fixture(
        name="llama-rope-linear", family="llama", seed=5000, config_rewrite="legacy",
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        contrast=NO_ROPE_SCALING, **llama_special()),
    Fixture(
        name="llama-rope-dynamic", family="llama", seed=5100, incremental=True,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=16, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}),
        contrast=NO_ROPE_SCALING, **llama_special()),
    Fixture(
        name="llama-rope-yarn", family="llama", seed=5200,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
                    max_position_embeddings=128, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                     "rope_theta": 100.0}),
        contrast={"rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}, **llama_special()),
    Fixture(
        name="llama-rope-llama3", family="llama", seed=5300,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=128, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                     "rope_theta": 10000.0}),
        contrast=NO_ROPE_SCALING, **llama_special()),
    Fixture(
        name="mistral-swa", family="mistral", seed=6000,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, sliding_window=8, tie_word_embeddings=False),
        contrast={"sliding_window": None}, **llama_special()),
    Fixture(
        name="qwen2-swa", family="qwen2", seed=6100,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                    tie_word_embeddings=False),
        contrast={"use_sliding_window": False}, **llama_special()),
    Fixture(
        name="qwen3", family="qwen3", seed=6200,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, attention_bias=True, max_position_embeddings=64, tie_word_embeddings=True),
        **llama_special()),
    Fixture(
        name="gemma", family="gemma", seed=6300,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=1,
                    head_dim=16, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh"),
        **llama_special()),
    Fixture(
        name="phi3", family="phi3", seed=6400,
        config=dict(SMALL, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=12,
                    partial_rotary_factor=0.5, tie_word_embeddings=False, pad_token_id=0),
        contrast={"sliding_window": None}, **llama_special()),
    Fixture(
        name="gpt2", family="gpt2", seed=6500,
        config=dict(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                    bos_token_id=0, eos_token_id=0),
        **gpt_special()),
    Fixture(
        name="gpt-neox", family="gpt_neox", seed=6600, config_rewrite="neox-legacy",
        config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10000,
                    use_parallel_residual=True, bos_token_id=0, eos_token_id=0),
        **gpt_special()),
    Fixture(
        name="gpt-neox-seq", family="gpt_neox", seed=6700,
        config=dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=64, rotary_pct=0.5,
                    use_parallel_residual=False, bos_token_id=0, eos_token_id=0),
        contrast={"use_parallel_residual": True}, **gpt_special()),
]

# ---------------------------------------------------------------- model


def hf_config(fx: Fixture, **changes):
    return CONFIG_MAPPING[fx.family](**{**fx.config, **changes}, attn_implementation="eager")


def build_model(fx: Fixture, seed: int) -> torch.nn.Module:
    """A random model whose every parameter (norms and biases too) is drawn from `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(fx))
    randomize_parameters(model, seed)
    return model.eval()


# Matrices that write into the residual stream (attention output, FFN output).
RESIDUAL_OUT = ("o_proj", "out_proj", "down_proj", "fc2", "c_proj", "attention.dense", "dense_4h_to_h")
# Outputs of non-gated MLPs (ReLU / GELU of fc1): their rows are centred, see below.
CENTRED_OUT = ("fc2", "mlp.c_proj", "dense_4h_to_h")
NORM_NAMES = ("norm", "ln_")
RESIDUAL_GAIN = 8.0
HEAD_GAIN = 4.0


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter so that no weight is left at a value that hides a bug.

    NOTE: transformers initialises norm weights to 1 and biases to 0, so a loader that dropped a
    norm weight or a bias would still match; here norm gains are 1 + N(0, 0.2) and biases N(0, 0.1).
    Matrices are N(0, 1/fan_in) so activations stay O(1), except:
    - embeddings are N(0, 1) and an untied LM head N(0, (HEAD_GAIN)^2/fan_in): logits then spread
      over several units, so greedy steps are not near-ties that float rounding could flip;
    - matrices writing into the residual stream are N(0, (RESIDUAL_GAIN)^2/fan_in): the layers
      then outweigh the input embedding in the residual stream. Otherwise a random model with a
      tied head just repeats its input token, and a constant greedy run would not catch a broken
      KV cache.
    Tied weights are one Parameter, which named_parameters() yields once (as the embedding).
    GPT-2's Conv1D weights are [in, out]: their fan_in is dim 0. Gemma stores RMSNorm gains as
    (gain - 1), so there the draw is N(0, 0.2) (the same effective gains), and its embedding is
    N(0, 1/hidden) (it is scaled by sqrt(hidden) in the forward pass).
    """
    gen = torch.Generator().manual_seed(seed)
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    gain_offset = 0.0 if model.config.model_type == "gemma" else 1.0
    # NOTE: Gemma multiplies the embedding by sqrt(hidden): N(0, 1/hidden) keeps it O(1) after that
    # (N(0, 1) would drown the layers and the tied head would repeat the input token).
    embed_std = model.config.hidden_size ** -0.5 if model.config.model_type == "gemma" else 1.0

    def normal(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    for name, p in model.named_parameters():
        fan_in = p.shape[0] if name in conv1d else (p.shape[1] if p.ndim == 2 else 1)
        if name.endswith("bias"):
            p.copy_(normal(p.shape, 0.1))
        elif any(k in name for k in NORM_NAMES):  # RMSNorm / LayerNorm gains (q_norm, ln_1, ...)
            p.copy_(gain_offset + normal(p.shape, 0.2))
        elif "lm_head" in name or "embed_out" in name:
            p.copy_(normal(p.shape, HEAD_GAIN / math.sqrt(fan_in)))
        elif "embed" in name or name.endswith(("wte.weight", "wpe.weight")):  # token and position embeddings
            p.copy_(normal(p.shape, embed_std))
        elif any(k in name for k in RESIDUAL_OUT):
            p.copy_(normal(p.shape, RESIDUAL_GAIN / math.sqrt(fan_in)))
        else:  # [out, in] projection
            p.copy_(normal(p.shape, 1.0 / math.sqrt(fan_in)))
        if name.endswith(".weight") and any(k in name for k in CENTRED_OUT):
            # NOTE: ReLU (and GELU) outputs have a positive mean; a random fc2 turns it into one large
            # vector added at every position, and every position then predicts the same token.
            # Rows of zero mean cancel that shared part (over the input dim: dim 0 of a Conv1D).
            p.sub_(p.mean(dim=0 if name in conv1d else 1, keepdim=True))


# ---------------------------------------------------------------- references


def make_prompts(fx: Fixture, seed: int) -> list[list[int]]:
    """BOS then random plain token ids (never a special token), one list per prompt."""
    rng = np.random.default_rng(seed)
    bos = fx.config["bos_token_id"]
    return [[bos] + rng.integers(fx.first_plain_id, VOCAB_SIZE, n - 1).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def last_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()  # [len, vocab]


@torch.no_grad()
def compute_reference(model, prompts: list[list[int]], incremental: bool = False) -> dict[str, np.ndarray]:
    """Prompt logits, then DECODE_STEPS greedy steps per prompt, each prompt alone (no padding).

    NOTE: every decode step reruns the whole sequence without a KV cache, so the reference does not
    depend on transformers' cache code; the math is the same as incremental decoding. With
    `incremental` (dynamic NTK RoPE, whose frequencies follow each call's length) every token, prompt
    tokens included, is fed alone through transformers' DynamicCache instead, as generate() decodes.
    """
    step = incremental_logits if incremental else last_logits
    prompt_logits, greedy, decode = [], [], []
    for ids in prompts:
        logits = step(model, ids)  # [len, vocab]
        prompt_logits.append(logits)
        seq, steps, step_logits = list(ids), [], logits[-1]
        for _ in range(DECODE_STEPS):
            token = int(np.argmax(step_logits))
            steps.append(step_logits)
            seq.append(token)
            step_logits = step(model, seq)[-1]
        greedy.append(seq[len(ids):])
        decode.append(np.stack(steps))
    offsets = np.cumsum([0] + [len(p) for p in prompts]).astype(np.int64)
    return {
        "prompt_ids_flat": np.concatenate([np.asarray(p, np.int64) for p in prompts]),
        "prompt_offsets": offsets,
        "prompt_logits": np.concatenate(prompt_logits).astype(np.float32),
        "greedy_ids": np.asarray(greedy, np.int64),
        "decode_logits": np.stack(decode).astype(np.float32),
    }


@torch.no_grad()
def incremental_logits(model, ids: list[int]) -> np.ndarray:
    """[len, vocab]: the tokens fed one at a time through a fresh DynamicCache."""
    cache, rows = DynamicCache(config=model.config), []
    for pos, tok in enumerate(ids):
        out = model(torch.tensor([[tok]]), position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True)
        rows.append(out.logits[0, -1].float().numpy())
    return np.stack(rows)


def min_greedy_gap(ref: dict[str, np.ndarray]) -> float:
    """Smallest top-1 minus top-2 logit over every recorded greedy step."""
    top2 = np.sort(ref["decode_logits"], axis=-1)[..., -2:]  # [B, steps, 2]
    return float((top2[..., 1] - top2[..., 0]).min())


def min_distinct_greedy(ref: dict[str, np.ndarray]) -> int:
    """Fewest distinct tokens in any prompt's greedy run."""
    return min(len(set(row.tolist())) for row in ref["greedy_ids"])


def good_seed(ref: dict[str, np.ndarray]) -> bool:
    return min_greedy_gap(ref) >= MIN_LOGIT_GAP and min_distinct_greedy(ref) >= MIN_DISTINCT_GREEDY


def check_reference(ref: dict[str, np.ndarray]) -> None:
    assert np.array_equal(ref["greedy_ids"], ref["decode_logits"].argmax(-1)), "greedy != argmax"
    offsets = ref["prompt_offsets"]
    # step 0 of decode is the last prompt position's logits
    last_rows = ref["prompt_logits"][offsets[1:] - 1]
    assert np.array_equal(last_rows, ref["decode_logits"][:, 0]), "decode step 0 != last prompt row"
    assert good_seed(ref), (min_greedy_gap(ref), min_distinct_greedy(ref))


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(fx: Fixture) -> Tokenizer:
    """A byte-level BPE with exactly VOCAB_SIZE entries; special tokens take the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=fx.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    # NOTE: like the real LLaMA and OPT tokenizer.json files, encoding prepends BOS by itself
    # (GPT-2 / Pythia files do not).
    bos, bos_id = fx.bos_token, fx.config["bos_token_id"]
    if fx.add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    assert tok.get_vocab_size() == VOCAB_SIZE, f"{fx.name}: vocab {tok.get_vocab_size()}"
    for i, t in enumerate(fx.special_tokens):
        assert tok.token_to_id(t) == i
    assert tok.token_to_id(fx.bos_token) == fx.config["bos_token_id"]
    assert tok.token_to_id(fx.eos_token) == fx.config["eos_token_id"]
    return tok


def tokenizer_config(fx: Fixture) -> dict:
    """tokenizer_config.json in the classic layout (chat template inline, not chat_template.jinja)."""
    if fx.family == "opt":
        # NOTE: the facebook/opt-* repos spell special tokens as AddedToken dicts; keep that form.
        def tok(t):
            return {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": True,
                    "rstrip": False, "single_word": False}
    else:
        def tok(t):
            return t
    cfg = {
        "add_bos_token": fx.add_bos,
        "add_eos_token": False,
        "bos_token": tok(fx.bos_token),
        "eos_token": tok(fx.eos_token),
        "clean_up_tokenization_spaces": False,
        "model_max_length": fx.config.get("max_position_embeddings") or fx.config["n_positions"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    cfg.update({k: tok(v) for k, v in fx.extra_tokenizer_config.items()})
    if fx.chat_template is not None:
        cfg["chat_template"] = fx.chat_template
    return cfg


def check_tokenizer_dir(fx: Fixture, path: Path, tok: Tokenizer) -> None:
    """transformers must load the directory and agree with the raw tokenizer."""
    hf = AutoTokenizer.from_pretrained(path)
    assert hf.bos_token_id == fx.config["bos_token_id"], (fx.name, hf.bos_token_id)
    assert hf.eos_token_id == fx.config["eos_token_id"], (fx.name, hf.eos_token_id)
    text = "Hello, world! The dragon said: 3.14"
    ids = tok.encode(text).ids
    assert ids.count(fx.config["bos_token_id"]) == int(fx.add_bos) and (ids[0] == fx.config["bos_token_id"]) == fx.add_bos
    assert hf(text)["input_ids"] == ids, (hf(text)["input_ids"], ids)
    assert tok.decode(ids) == text
    if fx.chat_template is not None:
        chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Tell me a story."}]
        rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert "Tell me a story." in rendered


# ---------------------------------------------------------------- writing


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed, but with fixed zip timestamps so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def save_model(fx: Fixture, model, path: Path) -> None:
    kwargs = {}
    if fx.sharded:
        # NOTE: a byte limit a bit above half the weights gives exactly two shards.
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        kwargs["max_shard_size"] = int(total * 0.6)
    model.save_pretrained(path, **kwargs)  # transformers 5 always writes safetensors
    shards = sorted(path.glob("*.safetensors"))
    if fx.sharded:
        assert len(shards) == 2 and (path / "model.safetensors.index.json").exists(), shards
    else:
        assert [s.name for s in shards] == ["model.safetensors"], shards
    if fx.config_rewrite == "legacy":
        write_legacy_config(path / "config.json")
    elif fx.config_rewrite == "neox-legacy":
        write_neox_legacy_config(path / "config.json")


def write_legacy_config(path: Path) -> None:
    """Rewrite config.json in transformers 4.x style: top-level rope_theta, torch_dtype, and a
    scaled RoPE as `"rope_scaling": {"type": ..., "factor": ...}`.

    NOTE: most checkpoints on the Hub were written that way, transformers 5 writes a
    rope_parameters dict and dtype; the loader has to read both, so some fixtures keep each.
    """
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", "default")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def write_neox_legacy_config(path: Path) -> None:
    """GPT-NeoX / Pythia as the EleutherAI repos write it: rotary_pct, rotary_emb_base, torch_dtype."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rotary_pct"] = rope["partial_rotary_factor"]
    cfg["rotary_emb_base"] = rope["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def reload_model(fx: Fixture, path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def check_contrast_matters(fx: Fixture, model, prompts, ref) -> None:
    """The feature the fixture exists for changes the logits of its longest prompt plus greedy tokens
    (a sliding window, a RoPE scaling, the residual wiring), so ignoring it cannot pass the tests."""
    if fx.contrast is None:
        return
    other = AutoModelForCausalLM.from_config(hf_config(fx, **fx.contrast)).eval()
    other.load_state_dict(model.state_dict())
    b = int(np.argmax([len(p) for p in prompts]))
    ids = prompts[b] + ref["greedy_ids"][b].tolist()
    diff = np.abs(last_logits(other, ids) - last_logits(model, ids)).max()
    assert diff > 1e-2, f"{fx.name}: {fx.contrast} changes logits by only {diff}"
    print(f"{fx.name}: without {fx.contrast} the logits move by up to {diff:.3f}")


def check_rope_theta_matters(fx: Fixture, model, prompts) -> None:
    """The references must change if a loader ignored rope_theta (it defaults to 10000)."""
    if fx.family != "llama" or fx.contrast is not None:
        return
    other = copy.deepcopy(model)
    for layer_rope in [m for m in other.modules() if type(m).__name__.endswith("RotaryEmbedding")]:
        dim = layer_rope.inv_freq.numel() * 2
        layer_rope.inv_freq.copy_(1.0 / 10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    ids = max(prompts, key=len)
    diff = np.abs(last_logits(other, ids) - last_logits(model, ids)).max()
    assert diff > 1e-2, f"{fx.name}: rope_theta changes logits by only {diff}"


def make_fixture(fx: Fixture, out_dir: Path) -> None:
    for seed in range(fx.seed, fx.seed + MAX_SEED_TRIES):
        model = build_model(fx, seed)
        prompts = make_prompts(fx, seed)
        ref = compute_reference(model, prompts, fx.incremental)
        if good_seed(ref):
            break
        print(f"{fx.name}: seed {seed} rejected: min greedy gap {min_greedy_gap(ref):.2e}, "
              f"min distinct greedy tokens {min_distinct_greedy(ref)}")
    else:
        raise SystemExit(f"{fx.name}: no seed in {MAX_SEED_TRIES} tries passes good_seed()")

    # NOTE: write into a temp dir beside the target and swap it in at the end, so a failure never
    # leaves a half-written fixture behind.
    final = out_dir / fx.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{fx.name}-", dir=out_dir))
    try:
        save_model(fx, model, tmp)
        # The reference comes from the model as reloaded from disk: what is saved is what was run.
        reloaded = reload_model(fx, tmp)
        ref_disk = compute_reference(reloaded, prompts, fx.incremental)
        for k in ref:
            if fx.incremental and k.endswith("_logits"):
                # NOTE: with dynamic RoPE the reloaded model's inverse frequencies are rebuilt through
                # another path than from_config's; logits move by ~1e-5 (greedy ids must not move).
                assert np.allclose(ref[k], ref_disk[k], rtol=0, atol=1e-4), f"{fx.name}: {k} differs after reload"
                continue
            assert np.array_equal(ref[k], ref_disk[k]), f"{fx.name}: {k} differs after reload"
        check_reference(ref_disk)
        check_rope_theta_matters(fx, reloaded, prompts)
        check_contrast_matters(fx, reloaded, prompts, ref_disk)

        tok = train_tokenizer(fx)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(fx), indent=2) + "\n")
        check_tokenizer_dir(fx, tmp, tok)
        save_npz(tmp / "reference.npz", ref_disk)
        check_npz(tmp / "reference.npz", ref_disk)

        if final.exists():
            shutil.rmtree(final)
        for f in tmp.iterdir():
            f.chmod(0o644)  # NOTE: mkdtemp and safetensors make owner-only files
        tmp.chmod(0o755)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(f.stat().st_size for f in final.iterdir())
    print(f"{fx.name}: seed {seed}, min greedy gap {min_greedy_gap(ref):.3f}, "
          f"min distinct {min_distinct_greedy(ref)}, {size} bytes, "
          f"greedy {ref['greedy_ids'].tolist()}")


def check_npz(path: Path, ref: dict[str, np.ndarray]) -> None:
    with np.load(path) as z:
        assert sorted(z.files) == sorted(ref), z.files
        for k in ref:
            assert z[k].dtype == ref[k].dtype and np.array_equal(z[k], ref[k]), k


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="fixtures to make (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    known = {fx.name: fx for fx in FIXTURES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        raise SystemExit(f"unknown fixture(s) {unknown}; known: {sorted(known)}")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # NOTE: one thread keeps float sums in one order across machines
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(known):
        make_fixture(known[name], args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
