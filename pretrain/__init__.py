"""The training job: config, distributed engines, checkpoints, tracking, evaluation, conversion.

Imports run one way: pretrain -> model -> xlstm_kernels, pretrain -> data.
"""
