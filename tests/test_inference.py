"""The Ensemble, numerically: a fold ensemble is the plain mean of its members, and TTA is the mean
over the 8 dihedral views, so its output does not change when the input is flipped or rotated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mitotype.config import ModelConfig
from mitotype.models.ensemble import Ensemble
from mitotype.models.registry import create_model

CPU = torch.device("cpu")


def ensemble_p(nets, u8: torch.Tensor, device: torch.device, tta: bool = False, amp: bool = False) -> torch.Tensor:
    """The ensemble's p_atypical as a tensor, to compare with torch.allclose."""
    return torch.from_numpy(Ensemble(nets, device=device, amp=amp).p_atypical(u8, tta))


class Probe(nn.Module):
    """A stand-in model whose p_atypical is a known function of its input: sigmoid(f(image))."""

    def __init__(self, f) -> None:
        super().__init__()
        self.f = f

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.f(batch["image"])
        return {"label": torch.stack([torch.zeros_like(z), z], dim=1)}

    def p_atypical(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["label"].softmax(dim=1)[:, 1]


def _images(n: int = 5, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _float(u8: torch.Tensor) -> torch.Tensor:
    return u8.permute(0, 3, 1, 2).float() / 255


def test_ensemble_is_the_mean_of_its_members() -> None:
    u8 = _images()
    x = _float(u8)
    a = Probe(lambda img: 6 * img.mean(dim=(1, 2, 3)) - 3)
    b = Probe(lambda img: 4 - 8 * img[:, 1, 2, 3])
    pa, pb = torch.sigmoid(6 * x.mean(dim=(1, 2, 3)) - 3), torch.sigmoid(4 - 8 * x[:, 1, 2, 3])
    assert torch.allclose(ensemble_p([a], u8, CPU), pa, atol=1e-6)
    assert torch.allclose(ensemble_p([b], u8, CPU), pb, atol=1e-6)
    assert torch.allclose(ensemble_p([a, b], u8, CPU), (pa + pb) / 2, atol=1e-6)
    assert torch.allclose(ensemble_p([a, b, b], u8, CPU), (pa + 2 * pb) / 3, atol=1e-6)
    assert (pa - pb).abs().min() > 0.05  # the members differ, so the mean is a real test


def test_tta_averages_the_eight_dihedral_views() -> None:
    """A probe reading the top-left pixel sees each of the 4 corners in 2 of the 8 views."""
    u8 = _images()
    x = _float(u8)
    probe = Probe(lambda img: 10 * (img[:, 0, 0, 0] - 0.5))
    corners = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]], dim=1)
    assert torch.allclose(ensemble_p([probe], u8, CPU), torch.sigmoid(10 * (corners[:, 0] - 0.5)), atol=1e-6)
    want = torch.sigmoid(10 * (corners - 0.5)).mean(dim=1)
    assert torch.allclose(ensemble_p([probe], u8, CPU, tta=True), want, atol=1e-6)
    other = Probe(lambda img: 3 * (img[:, 2, 1, 0] - img[:, 1, 0, 0]))  # ensemble and TTA together: mean over both
    both = ensemble_p([probe, other], u8, CPU, tta=True)
    assert torch.allclose(both, (want + ensemble_p([other], u8, CPU, tta=True)) / 2, atol=1e-6)


def test_tta_output_is_invariant_under_flips_and_rotations_of_the_input() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="test_efficientnet", pretrained="none", input_size=32, drop_rate=0.0)).eval()
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.mul_(50)  # spread the outputs so that orientation visibly matters without TTA
    u8 = _images(6, 32, seed=1)
    plain, tta = ensemble_p([model], u8, CPU), ensemble_p([model], u8, CPU, tta=True)
    for name, moved in (("hflip", u8.flip(2)), ("vflip", u8.flip(1)), ("rot90", torch.rot90(u8, 1, dims=(1, 2))),
                        ("transpose", u8.transpose(1, 2))):
        assert torch.allclose(ensemble_p([model], moved, CPU, tta=True), tta, atol=1e-5), name
        assert (ensemble_p([model], moved, CPU) - plain).abs().max() > 1e-3, name  # without TTA it does change
    assert (tta - plain).abs().max() > 1e-3


@pytest.mark.parametrize("logits, want", [([[0.0, 2.0], [3.0, -1.0]], [0.8807970779778823, 0.01798620996209156])])
def test_p_atypical_is_the_probability_of_class_1(logits, want) -> None:
    model = create_model(ModelConfig(backbone="test_efficientnet", pretrained="none", input_size=32))
    p = model.p_atypical({"label": torch.tensor(logits)})
    assert p.tolist() == pytest.approx(want, abs=1e-7)


def test_mixed_precision_is_cuda_only_and_results_come_back_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="test_efficientnet", pretrained="none", input_size=32)).eval()
    u8 = _images(4, 32)
    plain = ensemble_p([model], u8, CPU)
    assert torch.equal(ensemble_p([model], u8, CPU, amp=True), plain)  # no bfloat16 autocast on the CPU
    assert plain.device.type == "cpu" and plain.dtype == torch.float32 and plain.shape == (4,)


@pytest.mark.parametrize("name, available, count, want", [
    ("auto", False, 0, "cpu"), ("auto", True, 1, "cuda"), ("cpu", True, 1, "cpu"), ("cuda", True, 1, "cuda"),
    ("cuda:1", True, 2, "cuda:1"),
    ("cuda", False, 0, "device 'cuda': CUDA is not available on this machine (use device cpu)"),
    ("cuda:2", True, 2, "device 'cuda:2': this machine has 2 GPU(s)"),
    ("cuda:1", True, 1, "device 'cuda:1': this machine has 1 GPU(s)"),
    ("gpu", True, 1, "device 'gpu': expected auto, cpu, cuda or cuda:N"),
    ("meta", True, 1, "device 'meta': expected auto, cpu, cuda or cuda:N"),
])
def test_resolve_device(monkeypatch: pytest.MonkeyPatch, name: str, available: bool, count: int, want: str) -> None:
    from mitotype.errors import MitotypeError
    from mitotype.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if want.startswith("device"):
        with pytest.raises(MitotypeError) as info:
            resolve_device(name)
        assert str(info.value) == want
    else:
        assert resolve_device(name) == torch.device(want)


def test_resolve_device_defaults_to_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitotype.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == torch.device("cuda")
