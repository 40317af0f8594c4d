"""The distinctive parts of UCIR, BiC, WA and PODNet, on small tensors whose results are worked out by hand."""
import math

import numpy as np
import pytest
import torch

from harness.core.backbones import build_backbone
from harness.errors import ConfigError
from methods.bic import BiasLayer, balanced_kd_loss, bias_val_per_class, distillation_weight, split_for_bias_correction
from methods.podnet import (LocalSimilarityClassifier, adaptive_factor, nca_loss, pod_flat_loss, pod_spatial_loss,
                            stage_maps)
from methods.ucir import (CosineLinear, SplitCosineLinear, adaptive_lambda, imprinted_weights, less_forget_loss,
                          margin_ranking_loss)
from methods.wa import align_weights, clip_positive

E = math.e


def _set(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype))


# ---- UCIR -------------------------------------------------------------------------------------------------------

def test_cosine_linear_is_sigma_times_the_cosine_and_starts_at_sigma_one():
    fc = CosineLinear(2, 2)
    assert fc.sigma.item() == 1.0 and fc.weight.abs().max() <= 1 / math.sqrt(2)
    _set(fc.weight, [[3.0, 4.0], [0.0, -2.0]])
    x = torch.tensor([[6.0, 8.0]])
    assert torch.allclose(fc(x), torch.tensor([[1.0, -0.8]]))       # cos = 1 and (-16) / (10 * 2)
    _set(fc.sigma, [2.0])
    assert torch.allclose(fc(x), torch.tensor([[2.0, -1.6]]))
    assert CosineLinear(2, 2, sigma=False).sigma is None


def test_split_cosine_linear_grows_keeps_old_rows_and_sigma_and_freezes_them():
    first = CosineLinear(2, 2)
    _set(first.weight, [[1.0, 0.0], [0.0, 1.0]])
    _set(first.sigma, [4.0])
    split = SplitCosineLinear.grown_from(first, num_new=1)
    _set(split.fc2.weight, [[-1.0, 0.0]])
    assert split.sigma.item() == 4.0 and split.weight.tolist() == [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    x = torch.tensor([[0.0, 5.0]])
    assert torch.allclose(split.cosine(x), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.allclose(split(x), torch.tensor([[0.0, 4.0, 0.0]]))

    again = SplitCosineLinear.grown_from(split, num_new=2)           # both halves become the new old rows
    assert again.fc1.weight.tolist() == [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]] and again.fc2.weight.shape == (2, 2)

    again.freeze_old()
    old = again.fc1.weight.clone()
    new = again.fc2.weight.clone()
    opt = torch.optim.SGD([p for p in again.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    torch.nn.functional.cross_entropy(again(torch.tensor([[1.0, 2.0]])), torch.tensor([4])).backward()
    opt.step()
    assert torch.equal(again.fc1.weight, old) and not torch.equal(again.fc2.weight, new)


def test_imprinted_weights_are_the_normalised_mean_direction_at_the_old_mean_norm():
    old = torch.tensor([[3.0, 4.0], [0.0, 1.0]])                      # norms 5 and 1: mean 3
    rows = imprinted_weights([torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[0.0, -5.0]])], old)
    r = 3 / math.sqrt(2)                                              # mean of (1,0) and (0,1), normalised, x 3
    assert torch.allclose(rows, torch.tensor([[r, r], [0.0, -3.0]]))


def test_less_forget_loss_is_adaptive_lambda_times_mean_cosine_distance():
    assert adaptive_lambda(5.0, 40, 10) == 10.0                       # 5 * sqrt(4)
    new = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = less_forget_loss(new, old, 5.0, 40, 10)                    # cos 1 and 0: mean(1 - cos) = 0.5
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert new.grad is not None and old.grad is None


def test_margin_ranking_loss_uses_old_class_samples_and_their_top_k_new_scores():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7],     # old class 0: gt 0.9 vs 0.7, 0.5 -> 0.3, 0.1
                           [0.0, 0.0, 0.9, 0.9],     # new class 3: not used
                           [0.2, 0.4, 0.3, -0.5]])   # old class 1: gt 0.4 vs 0.3, -0.5 -> 0.4, 0
    loss = margin_ranking_loss(scores, torch.tensor([0, 3, 1]), num_old=2, margin=0.5, k=2)
    assert loss.item() == pytest.approx((0.3 + 0.1 + 0.4 + 0.0) / 4)
    assert margin_ranking_loss(scores, torch.tensor([2, 3, 2]), num_old=2).item() == 0.0


# ---- BiC --------------------------------------------------------------------------------------------------------

def test_bias_layer_is_the_identity_at_init_and_corrects_only_its_classes():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    layer = BiasLayer(2, 4)
    assert torch.equal(layer(logits), logits)
    _set(layer.alpha, [2.0])
    _set(layer.beta, [-1.0])
    assert layer(logits).tolist() == [[1.0, 2.0, 5.0, 7.0, 5.0]]


def test_balanced_kd_loss_weights_kd_by_the_old_class_share():
    assert distillation_weight(20, 10) == pytest.approx(2 / 3)
    # teacher uniform over 2 old classes, student uniform over 4: KD = ln 2, CE = ln 4, lambda = 2 / 4
    loss = balanced_kd_loss(torch.zeros(1, 4), torch.tensor([3]), torch.zeros(1, 2), temperature=2.0)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))


def test_validation_size_is_a_tenth_of_an_old_class_exemplars():
    assert bias_val_per_class(2000, 10) == 20 and bias_val_per_class(2000, 30) == 6


def test_bias_correction_split_holds_out_the_same_count_per_class_from_memory_and_new_data():
    memory = {0: list(range(10, 20)), 1: list(range(20, 30))}
    new = {2: list(range(100, 150))}
    train, val = split_for_bias_correction(memory, new, val_per_class=2, seed=3)
    owner = {i: c for c, idx in {**memory, **new}.items() for i in idx}
    assert sorted(owner[i] for i in val) == [0, 0, 1, 1, 2, 2]
    assert not set(train) & set(val) and sorted([*train, *val]) == sorted(owner)
    again_train, again_val = split_for_bias_correction(memory, new, val_per_class=2, seed=3)
    assert np.array_equal(again_val, val) and np.array_equal(again_train, train)


def test_bias_correction_split_refuses_shared_classes_and_emptied_classes():
    with pytest.raises(ConfigError, match="both in the memory and new"):
        split_for_bias_correction({0: [1, 2, 3]}, {0: [4, 5, 6]}, 1, seed=0)
    with pytest.raises(ConfigError, match="class 0 has 2 samples"):
        split_for_bias_correction({0: [1, 2]}, {1: [4, 5, 6]}, 2, seed=0)


# ---- WA ---------------------------------------------------------------------------------------------------------

def test_align_weights_rescales_new_rows_to_the_old_mean_norm():
    fc = torch.nn.Linear(2, 4)
    _set(fc.weight, [[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 2.0]])  # old norms 5, 1; new norms 10, 2
    gamma = align_weights(fc.weight, num_old=2, num_new=2)
    assert gamma == pytest.approx(0.5)                                  # mean 3 / mean 6
    assert fc.weight.tolist() == [[3.0, 4.0], [0.0, 1.0], [3.0, 4.0], [0.0, 1.0]]
    norms = fc.weight.norm(dim=1)
    assert norms[:2].mean().item() == pytest.approx(norms[2:].mean().item())


def test_clip_positive_zeroes_negative_weights_and_biases():
    fc = torch.nn.Linear(2, 2)
    _set(fc.weight, [[-1.0, 2.0], [0.5, -3.0]])
    _set(fc.bias, [-0.1, 0.2])
    clip_positive(fc)
    assert fc.weight.tolist() == [[0.0, 2.0], [0.5, 0.0]] and fc.bias.tolist() == pytest.approx([0.0, 0.2])


# ---- PODNet -----------------------------------------------------------------------------------------------------

def test_pod_spatial_on_a_one_channel_two_by_two_map():
    old = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])   # squared: row sums (4, 0), column sums (4, 0)
    new = torch.ones(1, 1, 2, 2)                       # squared: row sums (2, 2), column sums (2, 2)
    # normalised: (1, 0, 1, 0) / sqrt(2) vs (1, 1, 1, 1) / 2 -> squared distance 2 - sqrt(2)
    assert pod_spatial_loss([old], [new]).item() == pytest.approx(math.sqrt(2 - math.sqrt(2)))
    assert pod_spatial_loss([old], [new], normalize=False).item() == pytest.approx(4.0)   # |(2,-2,2,-2)|
    assert pod_spatial_loss([new], [new]).item() == 0.0
    # averaged over stages (an identical second stage halves it) and over the batch (two equal samples)
    two = pod_spatial_loss([old.repeat(2, 1, 1, 1), new], [new.repeat(2, 1, 1, 1), new])
    assert two.item() == pytest.approx(math.sqrt(2 - math.sqrt(2)) / 2)


def test_pod_flat_is_the_mean_cosine_distance_and_adaptive_factor_counts_seen_classes():
    new = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert pod_flat_loss(torch.tensor([[3.0, 0.0], [1.0, 0.0]]), new).item() == pytest.approx(0.5)
    assert adaptive_factor(60, 10) == pytest.approx(math.sqrt(6))


def test_lsc_aggregates_two_proxies_per_class_by_a_softmax_over_their_cosines():
    lsc = LocalSimilarityClassifier(2, 2, num_proxies=2)
    assert lsc.eta.item() == 1.0 and lsc.num_classes == 2
    _set(lsc.proxies[0], [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    # x = (2, 0): class 0 cosines (1, 0) -> e/(1+e) * 1; class 1 cosines (-1, 0) -> 1/(1+e) * -1
    # x = (0, 3): class 0 cosines (0, 1) -> e/(1+e);     class 1 cosines (0, -1) -> -1/(1+e)
    expected = torch.tensor([[E / (1 + E), -1 / (1 + E)]] * 2)
    assert torch.allclose(lsc(torch.tensor([[2.0, 0.0], [0.0, 3.0]])), expected)

    lsc.add_classes(1, torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
    assert lsc.num_classes == 3
    assert lsc(torch.tensor([[0.0, 3.0]]))[0, 2].item() == pytest.approx(1 / math.sqrt(2))
    lsc.freeze_old()
    assert [p.requires_grad for p in lsc.proxies] == [False, True]
    with pytest.raises(ValueError, match="expected"):
        lsc.add_classes(1, torch.zeros(3, 2))


def test_nca_loss_as_in_the_paper_margin_on_the_true_class_and_hinge():
    sims = torch.tensor([[0.5, 0.2, 0.2]])
    # -2 (0.5 - 0.6) + log(e^0.4 + e^0.4) = 0.2 + 0.4 + ln 2
    assert nca_loss(sims, torch.tensor([0]), margin=0.6, scale=2.0).item() == pytest.approx(0.6 + math.log(2))
    # -(1 - 0.6) + log(e^-1) < 0: hinged to 0
    assert nca_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([0])).item() == 0.0
    eta = torch.ones(1, requires_grad=True)
    nca_loss(sims, torch.tensor([1]), scale=eta).backward()
    assert eta.grad is not None and eta.grad.item() != 0.0


def test_nca_loss_as_released_margin_cancels_and_the_true_slot_counts_as_exp_zero():
    sims = torch.tensor([[0.5, 0.2, 0.2]])
    # 2 (s - 0.6) = (-0.2, -0.8, -0.8), minus the max -> (0, -0.6, -0.6): loss = log(1 + 2 e^-0.6)
    expected = math.log(1 + 2 * math.exp(-0.6))
    for margin in (0.6, 0.0):
        got = nca_loss(sims, torch.tensor([0]), margin=margin, scale=2.0, released_code=True)
        assert got.item() == pytest.approx(expected)
    # true class not the max: (0.2, 0.5) -> shifted (-0.3, 0): loss = 0.3 + log(e^0 + e^0)
    got = nca_loss(torch.tensor([[0.2, 0.5]]), torch.tensor([0]), released_code=True)
    assert got.item() == pytest.approx(0.3 + math.log(2))


def test_stage_maps_returns_each_stage_and_the_backbone_features():
    torch.manual_seed(0)
    net = build_backbone("resnet32", width=4).eval()
    x = torch.randn(2, 3, 32, 32)
    maps, features = stage_maps(net, x)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8)]
    assert torch.equal(features, net(x))
