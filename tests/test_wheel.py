"""The wheel installs one top-level package, `mmdiag`, and a fresh virtualenv that installs it
runs the demo (its dependencies taken from this environment, its code from the wheel alone)."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_holds_mmdiag_alone_and_runs_the_demo_from_a_fresh_virtualenv(tmp_path, cache, demo_models):
    demo_models("demo-late")  # trained once for the session (the wheel's training code is the same source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path, capture_output=True)
    wheel = next((tmp_path / "dist").glob("mmdiag-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mmdiag", wheel.name.split("-py")[0] + ".dist-info"}
    assert "mmdiag/reports/templates/report.html.j2" in names and "mmdiag/flows/hosting/prefect-3.8.8.sql" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # the dependencies from this environment, as a path (its .pth files, such as the editable
    # install of this checkout, are not read from there)
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q", str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "MMDIAG_CACHE": str(cache)}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import mmdiag.flows, sys; print(mmdiag.flows.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    demo = subprocess.run(
        [str(venv / "bin" / "mmdiag"), "demo", "--models", "demo-late", "--quick", "--out", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert (tmp_path / "runs" / "demo-late" / "report.html").is_file()
