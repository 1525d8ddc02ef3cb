#!/usr/bin/env bash
# Peer baseline environment (#28): StarDist 0.9.2 on TensorFlow 2.21 CPU (Keras 3), in its own virtual
# environment benchmarks/peer/.venv-stardist. Never equiseg's .venv, and equiseg is not installed in it.
# Idempotent: a second run only checks the pins (pip says "already satisfied") and prints the versions.
#   bash benchmarks/peer/setup.sh            # PYTHON=python3.11 bash ... to pick the interpreter
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-stardist"
PYTHON="${PYTHON:-python3}"

"$PYTHON" - <<'PY'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 13)):
    sys.exit(f"TensorFlow 2.21 wheels need Python 3.10-3.13, not {sys.version.split()[0]}: set PYTHON=")
PY
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
case "$("$VENV/bin/python" -c 'import sys; print(sys.prefix)')" in
    "$VENV") ;;
    *) echo "setup.sh: $VENV/bin/python is not that environment's interpreter" >&2; exit 1 ;;
esac

start=$(date +%s)
# the direct pins; the tested versions of everything they pull in come from the constraints file
"$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    -c "$HERE/constraints-stardist.txt" \
    tensorflow-cpu==2.21.0 keras==3.15.1 stardist==0.9.2 csbdeep==0.8.2 \
    numpy==2.4.6 pillow==13.0.0 tifffile==2026.3.3
"$VENV/bin/python" -m pip check
echo "installed in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) in $VENV"

TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" - <<'PY'
import platform
import csbdeep, keras, numpy, PIL, stardist, tensorflow as tf, tifffile
from stardist.models import StarDist2D  # noqa: F401  (the compiled parts load)
print(f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
      f"stardist {stardist.__version__}, csbdeep {csbdeep.__version__}, numpy {numpy.__version__}, "
      f"pillow {PIL.__version__}, tifffile {tifffile.__version__}")
try:
    import equiseg  # noqa: F401
    raise SystemExit("equiseg is importable in the peer environment; it must not be")
except ImportError:
    pass
PY
