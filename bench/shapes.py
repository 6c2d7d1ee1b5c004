"""The model and batch shapes the speed benches share (train_speed.py, op_profile.py).

Each overrides train.py's shakespeare-char-cpu preset; the optimizer settings stay the preset's.
A plain dict, importing nothing: op_profile.py --repo can read it before choosing whose
tinygrad_lite to import.
"""
SHAPES = {  # --shape: the model and the batch (the optimizer settings are the CPU preset's throughout)
    "cpu": {},  # the CPU preset: 4 layers, 128 wide, 4 heads, batch 12 x 64
    "long": dict(n_layer=4, n_embd=256, n_head=8, block_size=512, batch_size=4),
    "gpu-preset": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, dropout=0.0),
}
