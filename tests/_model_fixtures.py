"""A tiny Genesis shape shared by the model tests: GQA 4/2, head_dim 16, two layers."""

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
