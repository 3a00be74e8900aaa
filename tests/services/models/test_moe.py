import pytest
import torch

from services.models.moe import RoutedExperts


def reference(experts: RoutedExperts, x, ids, weights):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = (experts.w13[e] @ x[t]).chunk(2)
            out[t] += weights[t, k] * (experts.w2[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("tokens", [0, 1, 5, 40])
def test_grouped_and_looped_experts_compute_the_weighted_sum(grouped, tokens):
    torch.manual_seed(tokens)
    experts = RoutedExperts(num_experts=8, hidden=16, intermediate=12)
    torch.nn.init.normal_(experts.w13)
    torch.nn.init.normal_(experts.w2)
    experts.use_grouped_mm = grouped
    x = torch.randn(tokens, 16)
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(tokens)]) if tokens else torch.zeros(0, 3).long()
    ids[:, 0] = 7 if tokens else 0  # one hot expert, some experts get nothing
    weights = torch.rand(tokens, 3)
    with torch.no_grad():
        torch.testing.assert_close(
            experts(x, ids, weights), reference(experts, x, ids, weights), atol=1e-4, rtol=1e-4
        )
