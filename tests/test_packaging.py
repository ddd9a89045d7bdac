"""The built wheel, installed into a separate virtual environment, runs from a folder outside
the checkout: configs (pkg://paraflow.conf), strategies (paraflow.strategies) and the embedded
model all come from the installed package, and `paraflow` is its only top-level name.

The new environment gets its dependencies from this one's site-packages through a .pth line (so
the test needs no index); such a line puts a folder on sys.path without running the .pth files
in it, so the checkout's editable install does not leak in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
ENTRY_POINTS = ["paraflow.bench", "paraflow.batch", "paraflow.plan", "paraflow.tools.parity",
                "paraflow.tools.plan_check", "paraflow.tools.train", "paraflow.tools.caption_check",
                "paraflow.tools.samples", "paraflow.serve", "paraflow.serve.instance"]


def _copy_of_checkout(dest: Path) -> Path:
    """The tree git would commit (symlinks kept), so the build leaves nothing in the checkout."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, text=True, capture_output=True,
                           check=True).stdout.split()
    for name in files:
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    tree = _copy_of_checkout(root / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(root / "dist"), str(tree)],
                   check=True, capture_output=True, timeout=300)
    (found,) = (root / "dist").glob("paraflow-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding the wheel."""
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], text=True, capture_output=True,
                               check=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_paraflow_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    return python


def test_the_wheel_installs_one_top_level_name_with_configs_and_model(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"paraflow", wheel.name.split("-")[0] + "-"
                                                 + wheel.name.split("-")[1] + ".dist-info"}
    for needed in ("paraflow/conf/config.yaml", "paraflow/conf/strategy/distrifusion.yaml",
                   "paraflow/strategies/patch/groupnorm.py",
                   "paraflow/models/embedded/unet/diffusion_pytorch_model.safetensors"):
        assert needed in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "paraflow.strategies.displaced_patch:DistriFusion" in entry_points


def test_the_installed_package_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(installed), "-c", "import paraflow, paraflow.strategies.data as d;"
                            " print(paraflow.__file__); print(d.__file__)"], cwd=tmp_path,
                           text=True, capture_output=True, check=True).stdout.split()
    assert all(str(installed.parent.parent) in path for path in where), where
    proc = subprocess.run([str(installed), "-m", "paraflow", "steps=3", "output_dir=run",
                           "pipeline.progress=false"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"] == "tiny" and (tmp_path / "run" / record["images"][0]).is_file()


def test_every_entry_point_starts_from_the_installed_package(installed: Path,
                                                              tmp_path: Path) -> None:
    """`--help` of every entry point, all at once (each mostly imports: in parallel the two
    cores import two at a time)."""
    started = {module: subprocess.Popen([str(installed), "-m", module, "--help"], cwd=tmp_path,
                                        text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
               for module in ENTRY_POINTS}
    try:
        for module, proc in started.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{module}: {err[-2000:]}"
            assert out.strip(), module
    finally:  # none left running after a failure
        for proc in started.values():
            proc.kill()
            proc.wait()
