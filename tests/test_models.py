"""What a pretrained model needs: its chat template, a pad token distinct from its EOS,
its trained context, a loss that never holds the full logits, LoRA merged on save,
the PPO reference as the policy with its adapters off, and bf16 autocast."""
import pytest
import torch
from tiny import MICRO, TEXTS, chatml_tokenizer, tiny_lm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from instructflow.config import LoraConfig, OptimConfig, ProjectConfig
from instructflow.lm.encoding import dialog_messages, encode_prompt, encode_response, end_of_turn_id
from instructflow.lm.losses import LMLoss, causal_lm_loss
from instructflow.lm.modeling import (
    MAX_LEN_KEY,
    add_lora,
    build_tiny_llama,
    context_length,
    ensure_pad_token,
    load_causal_lm,
    merged,
    position_limit,
)
from instructflow.lm.training import make_accelerator, save_model_atomic, train_loop


def test_a_chat_template_renders_every_turn_and_the_answer_ends_with_its_end_of_turn_token():
    tok = chatml_tokenizer()
    prompt = "Hi there\n\nAssistant: Hello!\n\nHuman: What color is the ball?"
    assert dialog_messages(prompt) == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                                       {"role": "user", "content": "What color is the ball?"}]
    text = tok.decode(encode_prompt(tok, prompt))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat color is the ball?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == eot
    response = encode_response(tok, " It is red. ")
    assert response[-1] == eot and tok.decode(response[:-1]) == "It is red."
    # without a template: the project's plain format, ended by EOS
    plain_tok = tiny_lm()[1]
    assert plain_tok.decode(encode_prompt(plain_tok, "Hi")) == "Human: Hi\n\nAssistant:"
    assert encode_response(plain_tok, "Yes")[-1] == plain_tok.eos_token_id


def test_pad_equal_to_eos_becomes_the_unknown_token_and_the_vocabulary_stays():
    tok = chatml_tokenizer()
    model = build_tiny_llama(tok, MICRO, 0)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert tok.pad_token_id == tok.eos_token_id
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id not in (tok.eos_token_id, end_of_turn_id(tok))
    assert model.get_input_embeddings().weight.shape[0] == vocab and model.config.pad_token_id == tok.pad_token_id


def test_a_tokenizer_whose_only_spare_token_is_its_eos_gets_a_new_pad_token():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # GPT-2: <|endoftext|> is its EOS, BOS and unknown token, and it has no pad token
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    model = build_tiny_llama(tok, MICRO, 0)
    before = model.get_input_embeddings().weight.shape[0]
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == before + 1 == len(tok)


def test_the_context_is_the_trained_length_when_recorded(tmp_path):
    model, tok = tiny_lm()
    assert context_length(model) == position_limit(model) == MICRO.max_position_embeddings
    save_model_atomic(model, tok, tmp_path / "m", {MAX_LEN_KEY: 48})
    loaded, _ = load_causal_lm(tmp_path / "m")
    assert context_length(loaded) == 48 and position_limit(loaded) == MICRO.max_position_embeddings


@pytest.mark.parametrize("chunk", [3, 1024])
def test_lm_loss_equals_the_loss_on_full_logits_in_value_and_gradient(chunk):
    model, tok = tiny_lm()
    ids = torch.randint(3, 200, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    full = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    full.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = LMLoss(model, chunk_size=chunk)(input_ids=ids, attention_mask=mask, labels=labels)
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), abs=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-5), n


def test_lora_trains_only_adapters_and_saves_a_plain_merged_model(tmp_path):
    model, tok = tiny_lm()
    x = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        before = model(input_ids=x).logits
    peft_model = add_lora(model, LoraConfig(r=4), "causal_lm")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        LMLoss(peft_model)(input_ids=x).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        tuned = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():  # the PPO reference: the same weights, adapters off
            assert torch.allclose(peft_model(input_ids=x).logits, before, atol=1e-6)
    save_model_atomic(merged(peft_model), tok, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, tuned, atol=1e-4)
        assert not torch.allclose(tuned, before, atol=1e-3)


def test_a_lora_reward_model_trains_its_score_head_and_merges_it(tmp_path):
    model, tok = tiny_lm()
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    peft_rm = add_lora(rm, LoraConfig(r=4), "score")
    assert any(p.requires_grad and "score" in n for n, p in peft_rm.named_parameters())
    x = torch.randint(3, 200, (2, 10))
    opt = torch.optim.SGD([p for p in peft_rm.parameters() if p.requires_grad], lr=0.5)
    peft_rm(input_ids=x).logits.sum().backward()
    opt.step()
    with torch.no_grad():
        tuned = peft_rm(input_ids=x).logits
    save_model_atomic(merged(peft_rm), tok, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, tuned, atol=1e-5)


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    model, tok = tiny_lm()
    acc = make_accelerator(ProjectConfig(device="cpu"), mixed_precision="bf16")
    examples = [torch.randint(3, 200, (12,)) for _ in range(8)]
    res = train_loop(name="t", model=LMLoss(model), examples=examples, collate=lambda xs: {"input_ids": torch.stack(xs)},
                     loss_fn=lambda m, b: (m(input_ids=b["input_ids"]), {}), cfg=OptimConfig(batch_size=4, epochs=1),
                     out_dir=tmp_path, accelerator=acc, seed=0)
    assert res.steps == 2 and all(p.dtype == torch.float32 for p in model.parameters())


def test_pretrained_models_get_their_own_learning_rates_and_no_residual_dropout():
    from instructflow.config import parse_params

    builtin = parse_params({})
    real = parse_params({"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "ppo": {"lora": {"r": 8}},
                         "reward": {"lr": 3e-5}})
    assert (builtin.sft.lr, builtin.sft.residual_dropout) == (1e-3, 0.2)
    assert (real.sft.lr, real.sft.residual_dropout, real.reward.lr, real.ppo.lr) == (2e-5, 0.0, 3e-5, 3e-5)


def test_training_curves_also_reach_accelerate_trackers(tmp_path):
    model, _ = tiny_lm()
    acc = make_accelerator(ProjectConfig(device="cpu", trackers=["tensorboard"]), tracking_dir=tmp_path / "trackers",
                           run_name="sft")
    examples = [torch.randint(3, 200, (12,)) for _ in range(8)]
    train_loop(name="sft", model=LMLoss(model), examples=examples, collate=lambda xs: {"input_ids": torch.stack(xs)},
               loss_fn=lambda m, b: (m(input_ids=b["input_ids"]), {}), cfg=OptimConfig(batch_size=2, epochs=1, log_every=1),
               out_dir=tmp_path, accelerator=acc, seed=0)
    events = list((tmp_path / "trackers").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 4  # the JSONL log is kept


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_on_the_top_layers_only(arch):
    from transformers import GPT2Config, GPT2LMHeadModel

    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=300))
    else:
        model, _ = tiny_lm()
    peft_model = add_lora(model, LoraConfig(r=4), "causal_lm", top_layers=1)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    top = "layers.1." if arch == "llama" else "h.2."
    assert trained and all("lora_" in n and top in n for n in trained)
    assert len({n.split("lora_")[0] for n in trained}) >= 3  # attention and MLP projections, not just one
