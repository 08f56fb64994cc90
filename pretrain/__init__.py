"""The training job: config, distributed engines, checkpoints, tracking, evaluation, conversion.

Imports run one way: pretrain -> model -> kernels, pretrain -> data.
"""
