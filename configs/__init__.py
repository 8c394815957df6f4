"""Run configs: `get_config(arg)` functions returning locked `ml_collections.ConfigDict`s.

Importable (`from configs import pretrain`) and usable as files on the command line
(`--config configs/pretrain.py:base`, resolved from any working directory by
`cav_mae_jax.cli`). `common.py` holds the sections every task shares.
"""
