"""Rebuild every sample model and its data: python models/build_all.py [name ...]

Runs each models/build_<name>.py in its own process (so exporter registrations
and thread settings do not leak between them) and stops at the first failure.
Needs torch (CPU build is enough), scikit-learn, scipy, onnx and onnxruntime;
the onnxopt package itself does not depend on any of these build-only tools.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = ["digits_cnn", "inception_block", "tiny_bert", "crnn_ocr"]


def main(argv: list[str]) -> int:
    names = argv or MODELS
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    for name in names:
        script = HERE / f"build_{name}.py"
        print(f"### {script.name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)], cwd=HERE)
        if rc != 0:
            print(f"### {script.name} failed with exit code {rc}", file=sys.stderr)
            return rc
        print(f"### {script.name} done in {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
