"""`hlm.uncertainty`: u and ubar as defined, and the log-normaliser shortcut against the exact value."""

import torch

from hlm.uncertainty import uncertainty


def test_uncertainty_is_zero_when_peaked_and_high_when_flat():
    g = torch.Generator().manual_seed(0)
    peaked = torch.full((500,), -30.0)
    peaked[7] = 30.0
    assert uncertainty(peaked, 7, 20, 2.0, g) == (0.0, 0.0)
    assert uncertainty(torch.zeros(500), 7, 20, 2.0, g).u > 0.9
    assert uncertainty(torch.zeros(500), 7, 20, 2.0, g).ubar > 0.99


def test_uncertainty_matches_its_definition_in_expectation():
    """E[u] = E_theta[1 - softmax(z/theta)[d]]: compare the Gumbel estimate with numerical integration."""
    z = torch.tensor([2.0, 1.0, 0.5, 0.0])
    g = torch.Generator().manual_seed(1)
    draws = [uncertainty(z, 0, 20, 2.0, g) for _ in range(2000)]
    thetas = torch.linspace(1e-3, 2.0, 20001)
    exact = float((1 - torch.softmax(z[None] / thetas[:, None], -1)[:, 0]).mean())
    assert abs(sum(d.u for d in draws) / 2000 - exact) < 0.01
    assert abs(sum(d.ubar for d in draws) / 2000 - exact) < 0.005
    assert torch.tensor([d.ubar for d in draws]).std() < torch.tensor([d.u for d in draws]).std() / 2


def test_log_normaliser_matches_the_exact_logsumexp():
    from hlm.uncertainty import log_normaliser

    g = torch.Generator().manual_seed(3)
    z = torch.randn(151_936, generator=g) * 2.5
    z[11] = 22.0
    thetas = torch.tensor([1e-3, 0.05, 0.3, 1.0, 2.0])
    exact = torch.stack([torch.logsumexp((z.double() - 22.0) / t, 0) for t in thetas.double()])
    assert float((log_normaliser(z, thetas).double() - exact).abs().max()) < 1e-4
