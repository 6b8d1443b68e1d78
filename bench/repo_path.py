"""Makes this checkout's `cancerllm` importable without installing it, as on the lent GPU machine, where the repo's
files run under that machine's own python3 and nothing installs the package.

Importing this module puts the repo root on sys.path and registers a finder for `cancerllm.kernels`: the kernels
live in the top-level kernels/ folder, which only setup.py's package_dir (the installed package's mapping) turns
into `cancerllm.kernels`. The finder is appended after every other one, so it is consulted only when nothing else
resolves the name: an installed package's own mapping always wins. Also a pytest plugin (`-p bench.repo_path`),
so that the kernel tests import the same way, in xdist's workers too.
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS_PACKAGE = "cancerllm.kernels"


class KernelsFinder(importlib.abc.MetaPathFinder):
    """Resolves `cancerllm.kernels` to ROOT/kernels; its submodules are then found through the package's path.
    `resolved` says whether it did (the GPU check logs it: which way the kernels were imported)."""
    resolved = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != KERNELS_PACKAGE:
            return None
        folder = ROOT / "kernels"
        KernelsFinder.resolved = True
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not any(isinstance(finder, KernelsFinder) for finder in sys.meta_path):
    sys.meta_path.append(KernelsFinder())
