"""The one Ensemble and the backend choice: members must agree, the threshold is theirs unless the
user's, ``auto`` takes the stated order, and the allocator fix keeps freed activations in the process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from mitotype._io import code_revision
from mitotype.config import load_config
from mitotype.errors import MitotypeError
from mitotype.inference import runtime
from mitotype.models.artifact import save_model
from mitotype.models.ensemble import Ensemble, check_threshold
from mitotype.models.registry import create_model


def _save(folder: Path, *extra: str, threshold: float = 0.5, seed: int = 0) -> Path:
    cfg = load_config(None, [*TINY, *extra])
    torch.manual_seed(seed)
    save_model(create_model(cfg.model), cfg, folder, threshold=threshold, trained_on={}, metrics={})
    return folder


def test_the_threshold_is_the_members_mean_unless_the_user_gives_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save(run / "fold_0", threshold=0.3), _save(run / "fold_1", threshold=0.6, seed=1)
    assert Ensemble.load(run).threshold == pytest.approx(0.45)
    assert Ensemble.load(run, threshold=0.2).threshold == 0.2
    assert [e.threshold for e in Ensemble.load(run).each()] == [0.3, 0.6]  # each fold model alone keeps its own
    assert Ensemble([create_model(load_config(None, TINY).model)]).threshold == 0.5  # networks without cards
    for bad in (0.0, 1.0, float("nan"), -1, True):
        with pytest.raises(MitotypeError, match=r"must be in \(0, 1\)"):
            check_threshold(bad)


def test_members_that_disagree_on_their_input_are_refused_naming_the_field(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save(run / "fold_0"), _save(run / "fold_1", "data.patch_size=40", "model.input_size=40")
    with pytest.raises(MitotypeError, match=r"^ensemble members disagree on patch size: fold_0 32, fold_1 40$"):
        Ensemble.load(run)
    run2 = tmp_path / "run2"
    _save(run2 / "fold_0", "data.mpp=0.25"), _save(run2 / "fold_1", "data.mpp=0.5")
    with pytest.raises(MitotypeError, match=r"disagree on mpp: fold_0 0.25, fold_1 0.5"):
        Ensemble.load(run2)


def test_an_ensemble_is_the_mean_of_its_members_and_each_scores_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _save(run / "fold_0"), _save(run / "fold_1", seed=1)
    ensemble = Ensemble.load(run)
    x = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    alone = [e.p_atypical(x) for e in ensemble.each()]
    assert not np.allclose(alone[0], alone[1])
    np.testing.assert_allclose(ensemble.p_atypical(x), (alone[0] + alone[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(ensemble.p_atypical(x.numpy()), ensemble.p_atypical(x), atol=0)  # numpy or torch batches
    assert ensemble.labels(np.array([0.49, 0.5, 0.51])).tolist() == [False, True, True]


def test_cards_record_the_code_revision(tmp_path: Path) -> None:
    card = json.loads((_save(tmp_path / "m") / "model.json").read_text())
    assert card["code"] == code_revision() and card["code"]["mitotype_version"] == card["mitotype_version"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout: the commit is recorded
        assert len(card["code"]["git_commit"].split("-")[0]) == 40


def test_auto_takes_openvino_then_onnxruntime_then_torch_and_torch_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"openvino": True, "onnxruntime": True}
    monkeypatch.setattr(runtime, "openvino_available", lambda: installed["openvino"])
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: object() if installed.get(name) else None)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert runtime.auto_backend(cpu) == "openvino" and runtime.auto_backend(gpu) == "torch"
    installed["openvino"] = False
    assert runtime.auto_backend(cpu) == "onnxruntime"
    installed["onnxruntime"] = False
    assert runtime.auto_backend(cpu) == "torch"


def test_auto_falls_back_to_torch_with_a_warning_when_the_graph_cannot_be_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensemble = Ensemble.load(_save(tmp_path / "m"))
    monkeypatch.setattr(runtime, "cached_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("Unsupported: aten::foo")))
    with pytest.warns(UserWarning, match=r"backend auto: \w+ unavailable for this model \(Unsupported: aten::foo\); using torch"):
        assert runtime.make_backend("auto", ensemble) is ensemble
    with pytest.raises(RuntimeError, match="aten::foo"):  # a backend the user named is never swapped silently
        runtime.make_backend("onnxruntime", ensemble)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.make_backend("torch", ensemble) is ensemble
    other = tmp_path / "other.onnx"  # a user's --onnx file that does not fit: an error, not a quiet fall-back
    other.write_bytes(b"")
    monkeypatch.setattr(runtime, "check_export_matches", lambda *a: (_ for _ in ()).throw(MitotypeError(f"{other}: exported from other weights")))
    with pytest.raises(MitotypeError, match="exported from other weights"):
        runtime.make_backend("auto", ensemble, onnx_path=other)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_allocator_keeps_freed_activations_instead_of_refaulting_them() -> None:
    """The fix for 'more time in the kernel than in the model': a 64 MiB block (an activation of a
    192 px batch) comes from the heap, not a fresh mmap, and stays there when freed, so the next
    forward reuses its pages instead of faulting them in again (glibc's mallinfo2 counts both)."""
    code = textwrap.dedent("""
        import ctypes, sys
        import numpy as np
        from mitotype.models.ensemble import tune_allocator
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Info
        if sys.argv[1] == "tuned":
            assert tune_allocator()
        a = np.ones(8 << 20)  # 64 MiB, above glibc's largest default mmap threshold (32 MiB)
        mapped = libc.mallinfo2().hblkhd
        del a
        print(mapped, libc.mallinfo2().fordblks)
    """)
    got = {mode: [int(v) for v in subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                                  check=True).stdout.split()] for mode in ("plain", "tuned")}
    block = 64 << 20
    assert got["plain"][0] >= block and got["plain"][1] < block  # mmapped, and handed back to the kernel on free
    assert got["tuned"][0] < block and got["tuned"][1] >= block  # from the heap, and kept there for the next batch


def test_batchnorm_adaptation_averages_the_statistics_of_the_users_batches(tmp_path: Path) -> None:
    """Each BatchNorm layer's running mean becomes the plain average of its inputs' batch means
    over the given batches (momentum None), whatever the model was trained on; then scoring uses it."""
    ensemble = Ensemble.load(_save(tmp_path / "m"))
    net = ensemble.nets[0]
    first = next(m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda mod, args: seen.append(args[0].mean(dim=(0, 2, 3)).detach().clone()))
    g = torch.Generator().manual_seed(0)
    dark = [torch.randint(0, 60, (8, 32, 32, 3), dtype=torch.uint8, generator=g) for _ in range(3)]  # a 'shifted' set
    before = ensemble.p_atypical(dark[0])
    seen.clear()
    assert ensemble.adapt_batchnorm(iter(dark)) == 24
    hook.remove()
    assert len(seen) == 3
    torch.testing.assert_close(first.running_mean, torch.stack(seen).mean(dim=0), rtol=1e-5, atol=1e-6)
    assert first.momentum is not None and not first.training  # put back as it was
    assert np.abs(ensemble.p_atypical(dark[0]) - before).max() > 1e-4
    again = Ensemble.load(tmp_path / "m")
    again.adapt_batchnorm(iter(dark))
    np.testing.assert_array_equal(again.p_atypical(dark[1]), ensemble.p_atypical(dark[1]))  # reset first: the same result twice
    with pytest.raises(MitotypeError, match="no patches to adapt on"):
        again.adapt_batchnorm(iter([]))


def test_adapt_bn_runs_on_torch_and_refuses_a_graph_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    from conftest import run_cli, write_class_folders
    from helpers import assert_one_line_error

    model, data = _save(tmp_path / "m"), write_class_folders(tmp_path / "d", n_atypical=4, n_normal=6)
    code, _, err = run_cli(monkeypatch, capsys, "predict", data, "--model", model, "--out", tmp_path / "a.csv", "--adapt-bn")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "predict", data, "--model", model, "--out", tmp_path / "p.csv", "--backend", "torch")
    assert code == 0, err
    import pandas as pd

    adapted, plain = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "p.csv")
    assert (adapted["path"] == plain["path"]).all() and np.abs(adapted["p_atypical"] - plain["p_atypical"]).max() > 1e-4
    assert_one_line_error(run_cli(monkeypatch, capsys, "predict", data, "--model", model, "--out", tmp_path / "o.csv", "--adapt-bn",
                                  "--backend", "openvino"), "--adapt-bn needs the torch backend", "--backend openvino")
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", model, "--data", data, "--out", tmp_path / "ev", "--adapt-bn",
                           "--n-boot", "10")
    assert code == 0, err
