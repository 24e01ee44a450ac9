"""Small helpers shared by test modules (imported as ``tests.helpers``)."""

import torch


def one_line_error(result, *needles: str) -> None:
    """A CliRunner result failed with exit code 2 and exactly one ``Error:`` line naming ``needles``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("Error:")]
    assert len(error) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in error[0], error[0]


def trained_like(model, seed: int = 0):
    """Random scores, biases and BatchNorm statistics, so selections and tensors are not the
    initial ones; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "scores"):
                m.scores.copy_(torch.rand(m.scores.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.01 * torch.rand(m.num_features, generator=g) + 0.005)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()
