"""Move tuned entries keyed by a variant's whole generated module (lightgen before session 13) to the
per-kernel keys that lookups use now (render.kernel_key), for the given variants:

    python tools/rekey_tuned.py tuned_configs/sm90.json SPEC [SPEC ...]

An entry moves only if its key is the module key of one of the SPECs under the current templates, so
the kernel it was tuned on is exactly the one now keyed: nothing is guessed. Others stay as they are.
"""
import sys

from lightgen import configs, launch, render
from lightgen.spec import Variant


def renames(specs) -> dict:
    moves = {}
    for spec in specs:
        variant = Variant.parse(spec)
        for kernel in launch.kernels(variant):
            moves[(render.source_key(variant), kernel)] = render.kernel_key(variant, kernel)
    return moves


def main(argv) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path, specs = argv[0], argv[1:]
    print(f"{path}: moved {configs.rekey(path, renames(specs))} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
