"""imgemb_assets.core imports with dagster made unimportable (a GPU machine may have torch but not Dagster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_IMPORT_ALL_CORE_MODULES = """
import sys
sys.modules["dagster"] = None  # any `import dagster` now raises ImportError
import importlib, pkgutil
import imgemb_assets.core as core
# every module of every domain package (walk_packages imports each package to find its modules)
names = [m.name for m in pkgutil.walk_packages(core.__path__, "imgemb_assets.core.") if not m.ispkg and not m.name.endswith(".__main__")]
for name in names:
    importlib.import_module(name)
assert not any(m == "dagster" or m.startswith("dagster.") for m in sys.modules if sys.modules[m] is not None)
print(len(names))
"""


def test_core_imports_without_dagster() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL_CORE_MODULES], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    # every module of every domain was imported, not only the packages
    core = Path(__file__).resolve().parents[2] / "imgemb_assets" / "core"
    modules = [path for path in core.rglob("*.py") if path.name not in ("__init__.py", "__main__.py")]
    assert int(done.stdout.strip()) == len(modules) > 30


_GPU_MACHINE_IMPORTS = """
import sys
for name in ("dagster", "deltalake", "polars", "pyarrow", "boto3"):
    sys.modules[name] = None  # a GPU machine may have torch and nothing else of ours
import imgemb_assets.core.embedding_bench, imgemb_assets.core.embedding.inference, imgemb_assets.core.embedding.models
from imgemb_assets.core.embedding_bench import generated_thumbnails
assert len(generated_thumbnails(3)) == 3
"""


def test_the_embedding_core_and_bench_need_only_torch_numpy_and_pillow() -> None:
    done = subprocess.run([sys.executable, "-c", _GPU_MACHINE_IMPORTS], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
