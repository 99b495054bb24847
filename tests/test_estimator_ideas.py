"""The proposal variants of benchmarks/estimator_ideas.py keep the softmax-kernel estimator unbiased and positive
(Monte Carlo against exp(q.k)), so the benchmark compares estimators of the same quantity."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
ideas = importlib.import_module("estimator_ideas")


@pytest.mark.parametrize("name, draw", [
    ("iid", ideas.proposal(ideas.iid_pairs)),
    ("stratified", ideas.proposal(ideas.stratified)),
    ("kmeans", ideas.proposal(ideas.kmeans)),
    ("antithetic", ideas.proposal(ideas.iid_pairs, antithetic=True)),
    ("width-1.4", ideas.proposal(ideas.iid_pairs, width=1.4)),
])
def test_proposal_variants_estimate_the_softmax_kernel_without_bias(name, draw):
    torch.manual_seed(0)
    d, rows = 3, 64
    centers = torch.randn(1, 32, d, dtype=torch.float64) * 0.8 + 0.5
    q, k = torch.tensor([0.4, -0.3, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.5, -0.1], dtype=torch.float64)
    estimates = []
    for draw_id in range(300):
        w, b = draw(centers, rows, width=1.0, seed=0, layer_id=0, draw=draw_id)  # [1, rows, d], [1, rows]
        phi_q = torch.exp(w[0] @ q - q @ q / 2 + b[0])
        phi_k = torch.exp(w[0] @ k - k @ k / 2 + b[0])
        assert (phi_q > 0).all() and (phi_k > 0).all()
        estimates.append((phi_q * phi_k).mean())
    est = torch.stack(estimates)
    exact = math.exp(float(q @ k))
    assert abs(float(est.mean()) - exact) < 4 * float(est.std()) / math.sqrt(len(est)) + 1e-3 * exact, (name, float(est.mean()), exact)
