#!/usr/bin/env bash
# Build mitotype's wheel, install it into a clean venv and run it from outside the source tree:
# `mitotype --help`, the packaged recipe list, and one tiny `train`. Catches what an editable
# install hides (files left out of the wheel, code that reads the repository's folders).
# Dependencies (torch, timm, ... ~6 GB) are lent from .venv by a path entry, not reinstalled;
# mitotype itself comes only from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
.venv/bin/python -m pip wheel -q --no-deps -w "$WORK/dist" . 2>&1 | grep -v "^WARNING: Location" || true
WHEEL=$(ls "$WORK"/dist/mitotype-*.whl)
"${PYTHON:-python3}" -m venv "$WORK/venv"
DEPS=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" > "$SITE/zz_dependencies_from_dev_venv.pth"   # a plain path: .venv's editable hook is not run
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL" 2>&1 | grep -v "^WARNING: Location" || true
cd "$WORK"
venv/bin/python - "$WORK" <<'PY'
import sys, mitotype
assert mitotype.__file__.startswith(sys.argv[1]), f"mitotype imported from {mitotype.__file__}, not the wheel"
print(f"mitotype {mitotype.__version__} from the wheel: {mitotype.__file__}")
PY
venv/bin/mitotype --help > /dev/null
venv/bin/python -c "from mitotype.models.bundled import bundle_info; i = bundle_info(); print(f\"bundled model in the wheel: {i['folds']} folds, {i['bytes'] / 2**20:.1f} MiB\")"
PYTHONPATH="$ROOT/tests" venv/bin/python -c "from conftest import write_class_folders; from pathlib import Path; write_class_folders(Path('data'))"
venv/bin/mitotype train --data data --out run --recipe lite0-quick \
  --set model.pretrained=none --set model.backbone=test_efficientnet --set model.input_size=32 --set data.patch_size=32 \
  --set model.freeze_groups=0 --set train.epochs=1 --set train.batch_size=16
test -s run/model.json && test -s run/model.safetensors
venv/bin/mitotype predict data --model run --out preds.csv > /dev/null
test "$(wc -l < preds.csv)" -gt 40
echo "wheel check passed: $(basename "$WHEEL") installed in a clean venv trains and predicts"
