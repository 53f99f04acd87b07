"""Models and tokenizers: the built-in tiny Llama and its BPE tokenizer,
loading any Hugging Face causal LM and reward model, reward scores, and
residual dropout. (Text to tokens is encoding.py.)
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from ..config import TinyModelConfig

log = logging.getLogger(__name__)

BUILTIN = "builtin:tiny-llama"
PAD, EOS, BOS = "<|pad|>", "<|endoftext|>", "<|bos|>"

# --------------------------------------------------------------------------- tokenizer and model
def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained locally; pad, EOS and BOS are three distinct tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS)


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def ensure_pad_token(tokenizer, model: PreTrainedModel | None = None) -> None:
    """Give the tokenizer a pad token distinct from EOS, BOS and the end-of-turn token.

    instructflow masks padding everywhere (attention masks, loss masks, the RM reads its
    score at the last attended token), so the pad id never changes a result. A distinct
    pad matters to plain transformers, whose sequence classifiers read the score at the
    last token that is not the pad token: with pad == EOS (SmolLM2, Llama 3) they would
    read the token before the EOS. The choice, in order: the tokenizer's own pad when it
    is distinct; its unknown token when that is distinct (SmolLM2's <|endoftext|>), so
    the vocabulary stays as it is; else a new <|pad|> token, the embeddings grown by one.
    """
    from .encoding import end_of_turn_id

    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id, end_of_turn_id(tokenizer)}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in taken:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in taken:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def import_gguf(src: str | Path, out: str | Path) -> dict:
    """A GGUF checkpoint (llama.cpp's format) as a plain safetensors folder that
    `AutoModelForCausalLM.from_pretrained(out)` loads with no project code.

    transformers dequantizes the GGUF tensors to fp32 on load; its config then
    carries a `quantization_config` that makes `save_pretrained` refuse ("the
    model is quantized with gguf"), so the weights move into a model built from
    the config without it. The tokenizer, chat template included, comes from
    the GGUF file's metadata. Returns a summary of what was written."""
    from .training import save_model_atomic

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no GGUF file there")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    config.name_or_path = config._name_or_path = str(out)
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    save_model_atomic(model.eval(), tok, out)
    return {"source": str(src), "folder": str(out), "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "vocabulary": len(tok),
            "chat_template": bool(tok.chat_template)}


def _looks_local(path: str | Path) -> bool:
    """A hub id is 'name' or 'org/name'; anything else (or a Path) means a folder on disk."""
    text = str(path)
    return isinstance(path, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1


def model_source(name: str | Path) -> str:
    """A model's folder or hub id as from_pretrained takes it; a path that names no folder is a clear
    FileNotFoundError, not the hub client's complaint about repo ids."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_local(name) or path.exists():
        raise FileNotFoundError(f"{name}: model folder not found (run the stage that writes it, or check the path; "
                                "a hub id is 'name' or 'owner/name' and needs network access)")
    return str(name)


def from_hub(name: str | Path, load):
    """load(source) for a folder or hub id; a hub id that cannot be fetched is one clear OSError."""
    source = model_source(name)
    try:
        return load(source)
    except OSError as err:
        if Path(source).is_dir():
            raise
        raise OSError(f"{name}: not a local folder, and the Hugging Face hub has no model by that id or cannot be "
                      f"reached (hub ids need network access; give a folder instead): {str(err).splitlines()[0]}") from None


def load_tokenizer(path: str | Path):
    tok = from_hub(path, AutoTokenizer.from_pretrained)
    if tok.eos_token is None:
        raise ValueError(f"{path}: tokenizer has no EOS token; instructflow needs one to end responses")
    return tok


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    """Any Hugging Face causal LM by local path or hub id, with its tokenizer."""
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    ensure_pad_token(tok, model)
    return model, tok


MAX_LEN_KEY = "instructflow_max_len"  # saved in config.json by SFT and the RM: the length they trained on


def position_limit(model: torch.nn.Module) -> int:
    """The most positions the architecture can encode (8,192 for SmolLM2)."""
    config = unwrap(model).config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


def context_length(model: torch.nn.Module) -> int:
    """The most tokens a model is given: the length SFT or the RM trained it on, when recorded
    (`config.instructflow_max_len`), else its position limit. Sampling cuts prompts to it,
    and the export and the endpoint cut the RM's inputs to it: a model is never asked to
    read past the context it was trained on."""
    trained = getattr(unwrap(model).config, MAX_LEN_KEY, None)
    return min(position_limit(model), int(trained)) if trained else position_limit(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP and peft wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) shards this model or its root."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(getattr(model, "module", None), FSDPModule)


def layer_classes(model: torch.nn.Module) -> list[str]:
    """The class names of a transformers model's decoder layers (`_no_split_modules`), through a
    peft wrapper: what FSDP's transformer wrap policy makes one shard group each."""
    return list(getattr(unwrap(model), "_no_split_modules", None) or [])


def score_head(seq_cls: torch.nn.Module) -> torch.nn.Module:
    """The scalar head of a sequence classifier, whatever its class calls it."""
    model = unwrap(seq_cls)
    for name in ("score", "classifier", "classification_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(model).__name__}: no score head found (looked for score, classifier, classification_head)")


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM's or a classifier's head (LlamaModel, GPT2Model...)."""
    model = unwrap(model)
    return getattr(model, model.base_model_prefix)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout off, so that train mode (which gradient checkpointing needs) computes what eval
    mode would: RL trains without dropout (Huang et al. 2024), GPT-2 has 0.1 built in."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    config = unwrap(model).config
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "attention_probs_dropout_prob"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer layers (model.layers, transformer.h, gpt_neox.layers...)."""
    model = unwrap(model)
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: found no list of {n} transformer layers")


def train_top_layers(model: torch.nn.Module, n: int) -> None:
    """Freeze everything but the top `n` transformer layers, the final norm and the head (n = 0: train
    everything). The layers below then run without autograd: the backward pass stops at layer L - n."""
    if not n:
        return
    layers = decoder_layers(model)
    if n > len(layers):
        raise ValueError(f"train_top_layers={n}, but the model has {len(layers)} layers")
    keep = {id(p) for layer in list(layers)[-n:] for p in layer.parameters()}
    inner = unwrap(model)
    head = score_head(inner) if hasattr(inner, "score") or hasattr(inner, "classifier") else inner.get_output_embeddings()
    keep |= {id(p) for p in head.parameters()}
    in_layers = {id(p) for p in layers.parameters()}
    embeddings = {id(p) for m in inner.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    # the final norm: the vectors outside the layer stack (embeddings, token or position, stay frozen)
    keep |= {id(p) for p in inner.parameters() if p.ndim == 1 and id(p) not in in_layers}
    for p in inner.parameters():
        p.requires_grad_(id(p) in keep and id(p) not in embeddings)


def make_trainable(model: torch.nn.Module, lora, task: str, top_layers: int) -> torch.nn.Module:
    """What a stage trains: LoRA adapters (lora.r > 0) or the weights, of every layer or the top ones."""
    if lora.r:
        return add_lora(model, lora, task, top_layers)
    train_top_layers(model, top_layers)
    return model


def add_lora(model: torch.nn.Module, cfg, task: str, top_layers: int = 0) -> torch.nn.Module:
    """`model` with LoRA adapters (peft) when cfg.r > 0, else as it is. task: "causal_lm" or
    "score" (a sequence classifier: its score head trains whole beside the adapters).
    With `top_layers`, only the top layers get adapters."""
    if not cfg.r:
        return model
    from peft import LoraConfig, get_peft_model

    extra: dict = {"target_modules": cfg.target_modules}
    if top_layers:
        # peft takes layer indices only with module names, and the name of the layer list
        layers = decoder_layers(model)
        extra["layers_to_transform"] = list(range(len(layers) - top_layers, len(layers)))
        extra["layers_pattern"] = next(n.rsplit(".", 1)[-1] for n, m in unwrap(model).named_modules() if m is layers)
        if cfg.target_modules == "all-linear":
            from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

            extra["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n, m in layers.named_modules()
                                              if isinstance(m, (torch.nn.Linear, Conv1D))})
    if task == "score":
        name = next(n for n, m in model.named_children() if m is score_head(model))
        extra |= {"modules_to_save": [name], "task_type": "SEQ_CLS"}
    else:
        extra |= {"task_type": "CAUSAL_LM"}
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, **extra)
    return get_peft_model(model, lora)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model: LoRA adapters merged into the weights (a no-op without them)."""
    model = getattr(model, "module", model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- reward model
REWARD_BIAS_KEY = "reward_bias"


def load_reward_model(path: str | Path, dtype: str = "float32"):
    """The RM as plain transformers saves it (a sequence classifier, num_labels=1).

    `config.reward_bias` holds the offset that centres the demonstrations'
    rewards at 0; `reward_scores` adds it. (Llama-style heads have no bias
    parameter, so the offset lives in the saved config, not in the weights.)
    """
    tok = load_tokenizer(path)
    # Starting from a causal LM (the reward stage starts from SFT), the scalar head is new by design:
    # transformers' load report would flag it as MISSING in red; the report is replaced by one line here.
    hf_log = logging.getLogger("transformers.modeling_utils")
    hf_log.addFilter(_no_load_report)  # a filter, not a level: transformers checks that level for other reports
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=getattr(torch, dtype), output_loading_info=True)
    finally:
        hf_log.removeFilter(_no_load_report)
    new = [k for k in info["missing_keys"] if not k.startswith("score.")]
    if new:
        log.warning("%s: these reward-model weights were not in the checkpoint and start random: %s", path, new)
    elif info["missing_keys"]:
        log.info("%s: a new scalar score head on the model (the reward stage trains it)", path)
    return model, tok


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row is computed exactly
    like the same row unpadded (generate does the same)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (most transformers models
    do): then it can run its LM head on the last positions only."""
    return _forward_takes_logits_to_keep(type(unwrap(model)))  # peft passes it through to the model it wraps


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    """Per class, once: PPO asks on every minibatch."""
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def reward_bias(model: torch.nn.Module) -> float:
    """The centring offset stored in the RM's config (0 before `reward` sets it); sees through a DDP wrapper."""
    return float(getattr(unwrap(model).config, REWARD_BIAS_KEY, 0.0) or 0.0)


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward per row, read at the last non-pad token, bias included. (B,)

    Rows may be right- or left-padded (positions are taken from the mask)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask)).logits  # (B, 1)
    return logits.squeeze(-1) + reward_bias(model)


def shared_prompt_reward_scores(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                response_ids: torch.Tensor, response_mask: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Scalar reward per response, bias included, computing each prompt's tokens once for all its responses. (N,)

    prompt_ids/prompt_mask: (B, P), left-padded; response_ids/response_mask: (N, R), right-padded;
    owner: (N,) the prompt row of each response. The prompts run first and leave their keys and values in
    a KV cache; the cache is gathered to one row per response, and the responses run on top of it with
    positions that continue their prompt's. A response thus attends to its own prompt and its own earlier
    tokens exactly as in the full sequence, so values and gradients equal `reward_scores` on the N joined
    sequences (to float rounding; tests/test_reward_math.py), for P + K*R tokens instead of K*(P + R).
    Both passes go through `model` itself, so a DistributedDataParallel wrapper sees them.
    """
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(owner)
    prompt_len = prompt_mask.long().sum(-1)[owner]
    positions = prompt_len[:, None] + torch.arange(response_ids.size(1), device=response_ids.device)[None]
    mask = torch.cat([prompt_mask[owner], response_mask], dim=-1)
    logits = model(input_ids=response_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=False).logits  # (N, 1), read at each response's last non-pad token
    return logits.squeeze(-1) + reward_bias(model)


# --------------------------------------------------------------------------- residual dropout
# The attention and MLP blocks of decoder layer i: "model.layers.3.mlp" (Llama,
# Mistral, Qwen), "transformer.h.3.attn" (GPT-2).
_RESIDUAL_BRANCH = re.compile(r"\.\d+\.(self_attn|attn|mlp)$")

def add_residual_dropout(model: PreTrainedModel, p: float) -> int:
    """Dropout on every residual branch (attention and MLP outputs), as in the
    paper's SFT. Llama-style models have no such dropout built in, so it is
    added with forward hooks that act only in training mode. Returns the
    number of branches hooked; removes nothing from the saved model."""
    if p <= 0:
        return 0
    n = 0

    def hook(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True), *output[1:])
        return torch.nn.functional.dropout(output, p, True)

    for name, module in model.named_modules():
        if _RESIDUAL_BRANCH.search(name):
            module.register_forward_hook(hook)
            n += 1
    if n == 0:
        log.warning("residual dropout: found no attention/MLP branches to hook in %s", type(model).__name__)
    return n
