"""Factories that misbehave, for the CLI's error-path tests."""

import torch


def raises():
    raise RuntimeError("factory failed")


def wrong_shape():
    return torch.nn.Linear(2, 2)


def args_not_tuple():
    return torch.nn.Linear(2, 2), torch.randn(2)


def model_fails():
    return torch.nn.Linear(2, 2), (torch.randn(3, 5),)
