"""The GPT model and its host-side helpers (tokenizers, data)."""
