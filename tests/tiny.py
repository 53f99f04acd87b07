"""A very small model and tokenizer for unit tests (built in well under a second)."""
from instructflow.config import TinyModelConfig
from instructflow.lm.modeling import build_tiny_llama, train_tokenizer

TEXTS = ["Human: What color is the ball?\n\nAssistant: It is red.", "The blue fox runs near the lake.",
         "Ana has a green kite. Ben has a pink hat.", "Positive. Negative. I do not know."] * 20
MICRO = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position_embeddings=64)


def tiny_lm(seed=0):
    tok = train_tokenizer(TEXTS, MICRO.vocab_size)
    return build_tiny_llama(tok, MICRO, seed), tok

# A ChatML template like SmolLM2's (and Qwen's): a system turn first, <|im_end|> ends every turn.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer():
    """The tiny tokenizer dressed as SmolLM2's: a ChatML chat template, EOS = <|im_end|>,
    pad = EOS, and an unknown token <|endoftext|> that no chat turn uses."""
    tok = train_tokenizer(TEXTS, MICRO.vocab_size)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token = "<|im_end|>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"
    tok.chat_template = CHATML
    return tok
