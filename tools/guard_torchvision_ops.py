"""Make PyPI's CUDA-built torchvision importable next to a CPU-only torch.

PyPI's Linux torchvision wheels link their C++ ops against CUDA torch. With the
CPU torch wheel those ops cannot load; torchvision then works (transforms,
models) except that `_meta_registrations.py` registers fake kernels for
`torchvision::nms` / `qnms` without checking that the ops exist, so
`import torchvision` fails. This guards those two registrations. Idempotent;
does nothing when the C++ ops load.
"""

import argparse
import importlib.util
import pathlib
import sys

UNGUARDED = '@torch.library.register_fake("torchvision::'
GUARDED = '@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("torchvision::'


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("torchvision is not installed; nothing to do")
        return 0
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if UNGUARDED in text:
        path.write_text(text.replace(UNGUARDED, GUARDED))
        print(f"guarded torchvision fake-op registrations in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
