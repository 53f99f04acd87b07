"""A very small model and tokenizer for unit tests (built in well under a second)."""
from instructflow.config import TinyModelConfig
from instructflow.modeling import build_tiny_llama, train_tokenizer

TEXTS = ["Human: What color is the ball?\n\nAssistant: It is red.", "The blue fox runs near the lake.",
         "Ana has a green kite. Ben has a pink hat.", "Positive. Negative. I do not know."] * 20
MICRO = TinyModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position_embeddings=64)


def tiny_lm(seed=0):
    tok = train_tokenizer(TEXTS, MICRO.vocab_size)
    return build_tiny_llama(tok, MICRO, seed), tok
