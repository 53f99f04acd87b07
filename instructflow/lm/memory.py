"""How much memory each process needs for a stage: the `instructflow plan` command.

Per device, for one process of N, the parts a training step holds at its peak:

- weights of the trained model(s): whole (one process, DDP) or 1/N (FSDP2), plus, under
  FSDP2, the layers gathered to run (the one computing and the next, prefetched) and the
  embedding/head group, which stays gathered through a step;
- gradients (fp32, trained parameters only): whole or 1/N; DDP keeps a second copy in its
  all-reduce buckets for the whole run; the backward pass makes gradients as it frees the
  activations, so the peak holds the larger of the two (with the logits), not their sum;
- AdamW state: two fp32 moments per trained parameter, whole or 1/N;
- a trained embedding's gradient, built whole (dense) in the backward pass before it is
  accumulated (and, under FSDP2, reduce-scattered);
- frozen models (PPO's reference and RM): kept whole in every process (they carry no
  gradients or optimizer state, and rollouts would otherwise gather every layer at every
  generated token);
- activations saved for the backward pass: per token and trained layer, a LLaMA-style layer
  keeps 8 hidden-sized, 3 key/value-sized and 4 MLP-sized vectors (its inputs, norms, q/k/v
  before and after rotary, the attention output, gate, up, the activation and the product);
  with gradient checkpointing, one hidden vector per layer plus one layer's full set; one
  more layer's set is the backward pass's working memory. The RM's rows are its K responses
  on their prompt's KV cache, or, under FSDP2 or gradient checkpointing, each response joined
  to its prompt (prompt and response up to max_len each: reward.comparison_rewards);
- logits: the LM head's output where the loss needs it (SFT: chunks of 1,024 positions;
  PPO: every response token of a minibatch), fp32, with its softmax and gradient;
- PPO's rollout: the KV cache of the whole batch at full length.

CPU offload (FSDP2) moves weights, gradients and optimizer state to host memory: the
device keeps the gathered layers, activations and logits. `runtime_mb` is what the process
holds before any model (the CUDA context; on CPU the interpreter and libraries), measured,
not modelled. bench/distributed.py checks the predictions against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

MB = 2**20
STRATEGIES = ("ddp", "fsdp2", "fsdp2-lora", "fsdp2-offload")
SFT_LOSS_CHUNK = 1024  # losses.LMLoss's chunk of positions

# Public architectures for the table in docs/results.md (their config.json values).
PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Shape:
    """What memory depends on in an architecture."""

    params: int          # every parameter (a tied embedding counted once)
    layer_params: int    # one decoder layer
    embed_params: int    # the embedding, and the LM head when untied
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int          # key/value width: kv heads x head size
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        """From a transformers config (decoder-only, LLaMA-style names)."""
        h, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        i, v = config.intermediate_size, config.vocab_size
        layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * i + 2 * h  # q,o; k,v; gate,up,down; 2 norms
        embed = v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        return cls(layers * layer + embed + h, layer, embed, layers, h, i, kv * head_dim, v)

    @classmethod
    def preset(cls, name: str) -> Shape:
        from transformers import LlamaConfig

        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}: one of {', '.join(PRESETS)}, or a model folder")
        return cls.of(LlamaConfig(**PRESETS[name]))


@dataclass(frozen=True)
class Workload:
    """One stage's step, per process."""

    stage: str = "sft"               # sft | reward | ppo
    batch: int = 8                   # sequences per micro-batch (reward: comparisons; ppo: minibatch)
    seq_len: int = 256               # tokens per sequence (ppo: prompt + response)
    responses: int = 4               # reward: K responses per comparison; ppo: response tokens are seq_len - prompt_len
    prompt_len: int = 0              # ppo: the prompt's share of seq_len
    rollout_batch: int = 0           # ppo: rollouts generated per process per iteration (KV cache)
    trained_layers: int = 0          # 0: every layer (train_top_layers)
    lora_r: int = 0                  # adapters of rank r on every linear layer instead of full training
    gradient_checkpointing: bool = False
    weight_bytes: int = 4            # the stored (master) weights: 4 fp32 (bf16 autocast keeps fp32 masters); 2 bf16
    compute_bytes: int = 4           # activations, KV cache and FSDP's gathered layers: 2 under bf16 autocast


def trained_parameters(shape: Shape, w: Workload) -> int:
    layers = w.trained_layers or shape.layers
    head = shape.hidden if w.stage != "sft" else 0  # the RM's / value model's scalar head trains in every case
    if w.lora_r:  # A (r x in) and B (out x r) on q, k, v, o, gate, up, down
        per_layer = w.lora_r * ((shape.hidden + shape.hidden) * 2 + (shape.hidden + shape.kv_dim) * 2
                                + (shape.hidden + shape.intermediate) * 3)
        return layers * per_layer + head
    trained = layers * shape.layer_params + shape.hidden  # the final norm
    if not w.trained_layers:
        trained += shape.embed_params
    return trained + head


def _layer_activations(shape: Shape, tokens: int, w: Workload) -> float:
    return tokens * (8 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate) * w.compute_bytes


def predict(shape: Shape, w: Workload, strategy: str = "ddp", devices: int = 1, runtime_mb: float = 0.0) -> dict[str, float]:
    """Per-process memory in MB, part by part, with "total". strategy: ddp (one process is
    ddp with devices=1), fsdp2, fsdp2-lora (LoRA of the workload's rank, else 16) or fsdp2-offload."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp2-lora":
        strategy, w = "fsdp2", replace(w, lora_r=w.lora_r or 16)
    sharded, offload = strategy != "ddp", strategy == "fsdp2-offload"
    n = devices if sharded else 1
    trained_models = 2 if w.stage == "ppo" else 1  # PPO trains the policy and the value model
    trained = trained_parameters(shape, w)
    full = shape.params + (w.lora_r and trained)
    part: dict[str, float] = {}
    on_device = 0.0 if offload else 1.0
    part["weights"] = trained_models * full * w.weight_bytes / n * on_device
    if sharded:  # two layers gathered at a time, and the embedding group kept gathered through the step
        part["gathered"] = trained_models * (2 * shape.layer_params + shape.embed_params) * w.compute_bytes
    elif w.compute_bytes < w.weight_bytes:  # autocast keeps a low-precision copy of each weight through the step
        part["autocast_copies"] = trained_models * full * w.compute_bytes
    part["gradients"] = trained_models * trained * 4 / n * on_device
    if strategy == "ddp" and devices > 1:
        part["ddp_buckets"] = part["gradients"]
    part["optimizer"] = trained_models * trained * 8 / n * on_device
    if not w.lora_r and not w.trained_layers:  # its gradient is built whole (dense) before it is accumulated or scattered
        part["embedding_gradient"] = trained_models * shape.vocab * shape.hidden * 4
    if w.stage == "ppo":
        part["frozen"] = (1 if w.lora_r else 2) * shape.params * w.weight_bytes  # reference (LoRA: adapters off) and RM

    if w.stage == "reward" and (sharded or w.gradient_checkpointing):  # each response joined to its prompt
        tokens = w.batch * w.responses * 2 * w.seq_len
    elif w.stage == "reward":  # the prompts once, the responses on their cache
        tokens = w.batch * (1 + w.responses) * w.seq_len
    else:
        tokens = w.batch * w.seq_len
    layers_with_grad = w.trained_layers or shape.layers
    one_layer = _layer_activations(shape, tokens, w)
    if w.gradient_checkpointing:
        saved = layers_with_grad * tokens * shape.hidden * w.compute_bytes + one_layer
    else:
        saved = layers_with_grad * one_layer
    part["activations"] = saved + one_layer  # + the backward pass's working layer
    if w.stage == "sft":
        part["logits"] = 3 * min(tokens, SFT_LOSS_CHUNK) * shape.vocab * 4
    elif w.stage == "ppo":
        response = w.seq_len - w.prompt_len
        part["logits"] = 3 * w.batch * response * shape.vocab * 4
        kv_per_token = 2 * shape.layers * shape.kv_dim * w.compute_bytes
        part["kv_cache"] = (w.rollout_batch or w.batch) * w.seq_len * kv_per_token
    out = {k: round(v / MB, 1) for k, v in part.items()}
    out["runtime"] = round(runtime_mb, 1)
    # the backward pass frees activations as it makes gradients: they peak at different moments
    transient = out.get("activations", 0) + out.get("logits", 0)
    out["total"] = round(sum(v for k, v in out.items() if k not in ("gradients", "activations", "logits"))
                         + max(out["gradients"], transient), 1)
    return out



# --------------------------------------------------------------------------- from params.yaml
def shape_of_params(params, model: str = "") -> Shape:
    """The architecture a configuration trains, or `model` instead (a preset name, a folder or
    a hub id): a preset's, a folder's or hub id's config, or the built-in model's."""
    from transformers import AutoConfig, LlamaConfig

    from .modeling import BUILTIN, from_hub

    name = model or params.model.name_or_path
    if name in PRESETS:
        return Shape.preset(name)
    if name != BUILTIN:
        return Shape.of(from_hub(name, AutoConfig.from_pretrained))
    t = params.model.tiny
    return Shape.of(LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                                vocab_size=t.vocab_size, tie_word_embeddings=True))


def workloads(params, devices: int, responses: int = 0) -> dict[str, Workload]:
    """Each training stage's per-process step under this configuration on `devices` processes."""
    weight = 2 if params.model.dtype == "bfloat16" else 4
    compute = 2 if params.model.mixed_precision != "no" or weight == 2 else 4
    common = {"gradient_checkpointing": params.model.gradient_checkpointing, "weight_bytes": weight, "compute_bytes": compute}
    sft, rm, ppo = params.sft, params.reward, params.ppo
    k = responses or (params.collect.k if params.data.source == "builtin" else 2)
    ppo_len = min(rm.max_len, sft.max_len)
    return {
        "sft": Workload("sft", sft.batch_size, sft.max_len, trained_layers=sft.train_top_layers, lora_r=sft.lora.r, **common),
        "reward": Workload("reward", rm.batch_size, rm.max_len, responses=k, trained_layers=rm.train_top_layers,
                           lora_r=rm.lora.r, **common),
        "ppo": Workload("ppo", ppo.minibatch_size, ppo_len, prompt_len=max(1, ppo_len - ppo.max_new_tokens),
                        rollout_batch=max(1, ppo.batch_size // devices), trained_layers=ppo.train_top_layers,
                        lora_r=ppo.lora.r, **common),
    }


def plan_rows(shape: Shape, loads: dict[str, Workload], devices: int, device_gb: float) -> list[list[str]]:
    """Rows of `instructflow plan`: stage, strategy, GB per device, whether it fits."""
    rows = []
    for stage, w in loads.items():
        for strategy in STRATEGIES:
            gb = predict(shape, w, strategy, devices)["total"] / 1024
            rows.append([stage, strategy, f"{gb:,.1f}", "yes" if gb <= device_gb else "no"])
    return rows
