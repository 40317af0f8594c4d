"""Speed options keep outputs unchanged, and every benchmarks/perf script runs in its quick mode.

- batched augmentation (harness/data/batched.py): the same pixels as the per-image torchvision path for the same
  random choices, and the same distributions of choices;
- channels-last and torch.compile: outputs and gradients equal to eager NCHW within float tolerance;
- a whole trial: the same per-task accuracies with and without the speed options;
- benchmarks/perf/*.py --quick: run for real (so they never rot) and write their JSON.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from harness.core.backbones import build_backbone, prefers_channels_last
from harness.data import ArrayData, DatasetInfo, TaskDataset, build_transform, dataset_info
from harness.data.transforms import TimmRandAugment
from harness.data.batched import (build_batched_transform, crop_flip, hflip, normalize, random_crop_params,
                                  resolve_batched_augment)
from harness.core.loop import resolve_channels_last, train_phase
from harness.core.method import Method, PhaseConfig, TaskInfo
from harness.core.runtime import RuntimeContext

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "benchmarks" / "perf"
CIFAR = DatasetInfo("c", 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ---- batched crop / flip / normalise: same pixels as the per-image path ------------------------------------

@pytest.mark.parametrize("size,padding", [(32, 4), (8, 1)])
def test_batched_crop_flip_equals_per_image_random_crop(size: int, padding: int) -> None:
    x = _images(24, size)
    crop = v2.RandomCrop(size, padding=padding)            # what build_transform uses
    torch.manual_seed(1)
    params = [crop.make_params([img]) for img in x]        # torchvision's own draws, one image at a time
    flips = torch.rand(len(x)) < 0.5
    expected = torch.stack([F.horizontal_flip(crop.transform(img, prm)) if f else crop.transform(img, prm)
                            for img, prm, f in zip(x, params, flips)])
    top = torch.tensor([prm["top"] for prm in params])
    left = torch.tensor([prm["left"] for prm in params])
    assert top.max() > 0 and left.max() > 0                # the offsets really vary
    got = crop_flip(x, top, left, size, padding, flips)
    assert got.shape == expected.shape and got.dtype == torch.uint8
    assert torch.equal(got, expected)
    assert torch.equal(crop_flip(x, top, left, size, padding), torch.stack(
        [crop.transform(img, prm) for img, prm in zip(x, params)]))


def test_batched_flip_and_normalise_equal_per_image() -> None:
    x = _images(10)
    flips = torch.tensor([True, False] * 5)
    assert torch.equal(hflip(x, flips), torch.stack([F.horizontal_flip(i) if f else i for i, f in zip(x, flips)]))
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(CIFAR.mean), list(CIFAR.std))])
    got = normalize(x, torch.tensor(CIFAR.mean), torch.tensor(CIFAR.std))
    torch.testing.assert_close(got, torch.stack([ref(i) for i in x]), rtol=0, atol=1e-6)


def test_batched_resize_equals_per_image_resize() -> None:
    x = _images(6, 8)
    tf = build_batched_transform(DatasetInfo("d", 10, 8, (0.5,) * 3, (0.5,) * 3), {"image_size": 32, "augment": "none"})
    per_image = build_transform(DatasetInfo("d", 10, 8, (0.5,) * 3, (0.5,) * 3), train=True,
                                options={"image_size": 32, "augment": "none"})
    torch.testing.assert_close(tf(x), torch.stack([per_image(i) for i in x]), rtol=0, atol=1e-6)


def _position_image(size: int = 32) -> torch.Tensor:
    """Channel 0 = row + 1, channel 1 = column + 1 (0 is left for the zero padding)."""
    r = torch.arange(size)[:, None].expand(size, size)
    c = torch.arange(size)[None, :].expand(size, size)
    return torch.stack([r + 1, c + 1, torch.zeros_like(r)]).to(torch.uint8)


def test_batched_transform_draws_uniform_offsets_and_fair_flips() -> None:
    n, size, pad = 18_000, 32, 4
    info = DatasetInfo("pos", 10, size, (0.0,) * 3, (1.0,) * 3)           # identity normalisation
    tf = build_batched_transform(info, {"augment": "standard"})
    x = _position_image(size).expand(n, 3, size, size).contiguous()
    out = torch.round(tf(x, generator=torch.Generator().manual_seed(0)) * 255).to(torch.int64)
    top = out[:, 0, 16, 16] - 1 - (16 - pad)                               # centre rows are never padding
    c15, c16 = out[:, 1, 16, 15], out[:, 1, 16, 16]
    flipped = c16 < c15
    left = torch.where(flipped, c16 - 1 - (size - 1 - 16 - pad), c16 - 1 - (16 - pad))
    assert abs(flipped.float().mean().item() - 0.5) < 0.02                 # 5 sigma is 0.019
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1 and offsets.min() == 0           # exactly 0..8, like v2.RandomCrop
        expected = n / (2 * pad + 1)
        chi2 = (((counts - expected) ** 2) / expected).sum().item()
        assert chi2 < 30, counts                                           # 8 dof: p < 2e-4 when uniform
    assert (top == left).float().mean() < 0.2                              # drawn independently


# ---- whole pipelines (timm's RandAugment itself: tests/test_augment_fidelity.py) ------------------------------

def test_batched_pipeline_has_the_per_image_pipelines_distribution() -> None:
    """Whole pipelines (crop, flip, normalise) on structured images: the per-pixel first and second moments over
    many draws agree as closely as two per-image runs agree with each other. (Brightness jitter: same pixels for
    the same factors; with RandAugment the batched path runs the per-image pipeline itself. Both in
    tests/test_augment_fidelity.py.)"""
    info = dataset_info("cifar10")
    options = {"augment": "standard"}
    r, c = torch.arange(32)[:, None].expand(32, 32), torch.arange(32)[None, :].expand(32, 32)
    base = torch.stack([c * 8, r * 8, ((r // 4 + c // 4) % 2) * 200 + 20]).to(torch.uint8)
    x = torch.stack([base, base.flip(-1), base.flip(-2), 255 - base])
    per_image, batched = build_transform(info, True, options), build_batched_transform(info, options)
    k = 300
    torch.manual_seed(0)

    def moments(y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y.mean(0), y.square().mean(0)])

    def per_image_moments() -> torch.Tensor:
        return moments(torch.stack([torch.stack([per_image(img) for img in x]) for _ in range(k)]))

    a, a2 = per_image_moments(), per_image_moments()
    b = moments(batched(x.repeat(k, 1, 1, 1)).view(k, *x.shape))
    noise = (a - a2).abs().mean()            # two per-image runs differ by sampling noise only
    # Same distribution: |pooled reference - batched| ~ sqrt(3/4) noise = 0.87 (measured 0.83-0.98 over seeds;
    # the broken variants above give 1.12-2.3).
    assert ((a + a2) / 2 - b).abs().mean() < 1.05 * noise


def test_build_batched_transform_mirrors_build_transform() -> None:
    for info, options in ((CIFAR, {}), (CIFAR, {"augment": "randaugment"}), (CIFAR, {"augment": "none"}),
                          (DatasetInfo("d", 10, 8, (0.5,) * 3, (0.5,) * 3), {"image_size": 32}),
                          (DatasetInfo("big", 10, 224, (0.5,) * 3, (0.5,) * 3), {"rand_augment": True})):
        steps = build_transform(info, train=True, options=options).transforms
        tf = build_batched_transform(info, options)
        crops = [s for s in steps if isinstance(s, v2.RandomCrop)]
        if any(isinstance(s, TimmRandAugment) for s in steps):   # the random part stays per image (timm, PIL)
            assert tf.crop is None and not tf.flip
            assert [type(s) for s in tf.per_image.transforms[1:]] == [type(s) for s in steps[1:-2]]
            continue
        assert (tf.crop is not None) == bool(crops)
        if crops:
            assert tf.crop == crops[0].size[0] and tf.padding == crops[0].padding[0]
        assert tf.flip == any(isinstance(s, v2.RandomHorizontalFlip) for s in steps)
        if info.image_size > 64:   # the per-image half keeps the random resized crop
            assert any(isinstance(s, v2.RandomResizedCrop) for s in tf.per_image.transforms)
            out = tf(torch.stack([tf.per_image(img) for img in _images(3, 300)]))
            assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float32
        else:
            assert tf.per_image is None


def test_batched_augment_option() -> None:
    assert resolve_batched_augment("auto", torch.device("cpu")) is False
    assert resolve_batched_augment("auto", torch.device("cuda")) is True
    assert resolve_batched_augment(True, torch.device("cpu")) is True
    assert resolve_batched_augment("false", torch.device("cuda")) is False
    from harness.errors import ConfigError
    with pytest.raises(ConfigError):
        resolve_batched_augment("maybe", torch.device("cpu"))


def test_task_dataset_without_transform_returns_uint8_images() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ds = TaskDataset(ArrayData(arr, np.arange(5), [str(i) for i in range(5)]), None)
    x, y = ds[2]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 2
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(arr[2]))


# ---- channels-last and torch.compile: same outputs ------------------------------------------------------

def _fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    fa, fb = (torch.cat([t.double().flatten() for t in ts]) for ts in (a, b))
    return ((fa - fb).norm() / fb.norm()).item()


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_resnet32_matches_nchw(train: bool) -> None:
    """Eval-mode BatchNorm: outputs and gradients agree to fp32 precision. Train-mode BatchNorm on a batch of 8
    is ill-conditioned backwards: a 1e-7 relative nudge of the input moves NCHW's own fp32 gradients by up to
    ~4e-3 and fp32 NCHW is up to 1.4e-2 off fp64 (measured), so there gradients are only held to that level;
    outputs and BN running statistics still agree to fp32 precision."""
    import copy

    torch.manual_seed(0)
    model = build_backbone("resnet32").train(train)
    x = torch.randn(8, 3, 32, 32)
    nchw = copy.deepcopy(model)
    out, grads = _fwd_bwd(nchw, x)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl_model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    cl_out, cl_grads = _fwd_bwd(cl_model, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl_out, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(list(cl_model.buffers()), list(nchw.buffers()), rtol=1e-4, atol=1e-5)
    assert _rel(cl_grads, grads) < (5e-2 if train else 1e-3)   # eval: measured 1e-4 (NCHW fp32 vs fp64 alike)


def test_channels_last_auto_picks_cnns_only() -> None:
    from methods.dytox import DyTox, DyToxConfig

    assert prefers_channels_last(build_backbone("resnet32"))
    assert prefers_channels_last(build_backbone("tiny_cnn"))
    dytox = DyTox(DyToxConfig(embed_dim=32, depth=2, num_heads=2, local_up_to_layer=1))
    assert not prefers_channels_last(dytox)
    assert resolve_channels_last("auto", build_backbone("tiny_cnn")) is True
    assert resolve_channels_last("false", build_backbone("tiny_cnn")) is False
    assert resolve_channels_last(True, dytox) is True


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_matches_eager(backend: str) -> None:
    """aot_eager: dynamo capture + AOT autograd, seconds; inductor (the default `compile: true` backend, which
    builds C++ kernels with gcc on CPU): minutes, in the slow suite."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, model = _Tiny().train(), _Tiny().train()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(6, 3, 8, 8)
    ref_out, ref_grads = _fwd_bwd(eager, x)
    out, grads = _fwd_bwd(torch.compile(model, backend=backend), x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# ---- the loop with every option ------------------------------------------------------------------------

class _TinyMethod(Method):
    """A TinyCNN classifier trained with cross-entropy; records what each step was given."""

    def __init__(self) -> None:
        from harness.core.backbones import TinyCNN

        super().__init__({}, torch.device("cpu"))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(TinyCNN(4), torch.nn.Linear(8, 2))
        self.seen: list[tuple] = []
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, task, phase) -> torch.Tensor:
        x, y = batch
        self.seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last), tuple(x.shape)))
        self.batches.append((x.detach().clone(), y.clone()))
        return torch.nn.functional.cross_entropy(self.net(x), y % 2)


def test_train_phase_with_batched_augment_and_channels_last() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    data = ArrayData(arr, np.arange(32) % 2, ["a", "b"])
    tf = build_batched_transform(CIFAR, {"augment": "randaugment"})
    method = _TinyMethod()
    phase = PhaseConfig(epochs=2, batch_size=8, lr=0.05, sched="constant", repeated_aug=3)
    task = TaskInfo(0, 1, (0, 1), 0, 2)
    stats = train_phase(method, TaskDataset(data, tf.per_image), phase, task, RuntimeContext(progress=False),
                        seed=0, batch_transform=tf, channels_last="auto")
    assert stats["steps"] == 8 and math.isfinite(stats["loss"])
    assert set(method.seen) == {(torch.float32, True, (8, 3, 32, 32))}
    assert method.model[0].body[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_repeated_copies_on_different_ranks_get_different_augmentations() -> None:
    """Every rank seeds its global RNG alike; the batched path draws from a per-rank generator, so the copies of
    an image that repeated augmentation sends to different ranks are augmented differently."""
    arr = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    data = ArrayData(arr, np.arange(8), [str(i) for i in range(8)])     # label = the image's index
    tf = build_batched_transform(CIFAR, {"augment": "standard"})   # crop + flip: batched draws
    phase = PhaseConfig(epochs=1, batch_size=8, lr=0.0, sched="constant", repeated_aug=2)
    drawn = {}
    for rank in (0, 1):
        method = _TinyMethod()
        train_phase(method, TaskDataset(data, None), phase, TaskInfo(0, 1, (0, 1), 0, 2),
                    RuntimeContext(rank=rank, world_size=2, progress=False), seed=0, batch_transform=tf)
        ((x, y),) = method.batches                # one global batch of 8: 4 images, twice, 4 per rank
        drawn[rank] = (x, y.tolist())
    assert sorted(drawn[0][1]) == sorted(drawn[1][1]) and len(set(drawn[0][1])) == 4   # each rank: every copy ...
    by_image = [{y: x for x, y in zip(*drawn[rank])} for rank in (0, 1)]
    for image in drawn[0][1]:                                                            # ... augmented differently
        assert not torch.allclose(by_image[0][image], by_image[1][image]), image


def test_trial_results_with_the_speed_options_equal_the_plain_ones(tmp_path: Path) -> None:
    """Real trials (2 tasks of digits, no random augmentation: batched draws differ from per-image ones by
    design). Batched augmentation gives the very same losses and accuracies; channels-last convolutions agree
    with NCHW to fp32 tolerance, so its losses agree to that tolerance and a test image on a decision boundary
    may flip: at most one per task (measured: one of 288, on task 2)."""
    from harness.config.compose import resolve_config
    from harness.data import load_dataset
    from harness.run.local import run_local
    from harness.config.identity import expand_trials

    history = {}
    for name, opts in {"plain": {"batched_augment": False, "channels_last": False},
                       "batched": {"batched_augment": True, "channels_last": False},
                       "channels_last": {"batched_augment": False, "channels_last": "auto"}}.items():
        config = resolve_config("finetune", "digits-5x2", overrides={
            "epochs": 1, "base_epochs": 1, "initial_increment": 2, "increment": 8, "augment": "none", **opts})
        (result,) = run_local(expand_trials(config), tmp_path / name, log=lambda s: None, progress=False)
        assert result["status"] == "finished", result.get("traceback")
        history[name] = [(row["loss"], row["accuracy_per_task"]) for row in result["history"]]
    assert history["batched"] == history["plain"]
    assert history["plain"][0][1][0] > 75        # digits 0 / 1 are learnt in one epoch: the comparison means something
    test_labels = load_dataset("digits", None, "test").y                   # natural order: label = class id
    one_image = [100 / np.isin(test_labels, classes).sum() for classes in ([0, 1], range(2, 10))]
    for (loss, accs), (plain_loss, plain_accs) in zip(history["channels_last"], history["plain"]):
        assert loss == pytest.approx(plain_loss, rel=1e-5)
        assert all(abs(a - b) <= one_image[t] + 1e-9 for t, (a, b) in enumerate(zip(accs, plain_accs)))


# ---- every perf script, quick mode ---------------------------------------------------------------------

# script -> (pytest marks, its JSON output flag). harness_overhead starts Ray: about a minute, slow suite.
QUICK_SCRIPTS = {"data_pipeline.py": ([], "--output"), "model_throughput.py": ([], "--output"),
                 "end_to_end.py": ([], "--output"), "harness_overhead.py": (["slow"], "--output"),
                 "dytox_throughput.py": ([], "--out")}


def test_every_perf_script_is_covered() -> None:
    scripts = {p.name for p in PERF.glob("*.py") if p.name != "perfutil.py" and not p.name.startswith("_")}
    missing = scripts - set(QUICK_SCRIPTS)
    assert not missing, f"add {sorted(missing)} to QUICK_SCRIPTS so CI runs their --quick mode"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"perf_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", [pytest.param(s, marks=[getattr(pytest.mark, m) for m in marks])
                                    for s, (marks, _) in QUICK_SCRIPTS.items()])
def test_perf_script_quick_mode(script: str, tmp_path: Path) -> None:
    path = PERF / script
    if not path.is_file():
        pytest.skip(f"{script} is not in this checkout yet")
    out = tmp_path / "out.json"
    module = _load(path)
    assert module.main(["--quick", QUICK_SCRIPTS[script][1], str(out)]) in (0, None)
    report = json.loads(out.read_text())
    assert report, "empty report"
    if "results" in report:
        assert report["results"], "no measurements"
        for r in report["results"]:
            for key in ("images_per_s", "wall_s_median"):
                if key in r:
                    assert r[key] > 0 and math.isfinite(r[key])
    for kind, launcher in report.get("summary", {}).items():   # harness_overhead: Ray vs the plain loop
        assert launcher["wall_s_median"] > 0 and launcher["startup_s_median"] >= 0, kind
        if launcher["threads"] == report["summary"]["local"]["threads"]:   # same threads: bitwise equal
            assert launcher["same_metrics_as_local"], f"{kind} trained differently from the plain loop"
    sys.modules.pop(f"perf_{path.stem}", None)


@pytest.mark.slow
def test_train_phase_compiled_matches_eager() -> None:
    """`compile: true` in the real loop (inductor, gcc on CPU): the same losses as eager, step for step."""
    arr = np.random.default_rng(1).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    data = TaskDataset(ArrayData(arr, np.arange(32) % 2, ["a", "b"]), build_transform(CIFAR, train=False))
    phase = PhaseConfig(epochs=2, batch_size=8, lr=0.05, sched="constant")
    task = TaskInfo(0, 1, (0, 1), 0, 2)
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        method = _TinyMethod()
        stats = train_phase(method, data, phase, task, RuntimeContext(progress=False), seed=0,
                            compile_model=compiled)
        losses[compiled] = stats["loss"]
        assert isinstance(method.net, torch.nn.Module) and method.net is method.model   # restored after the phase
    assert math.isclose(losses[True], losses[False], rel_tol=1e-4), losses
