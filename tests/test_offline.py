"""Nothing is fetched at run time: every stage module, the CLI and the inference runtimes import with sockets
blocked."""

import importlib.util
import subprocess
import sys

from pipeline.cli import STAGES

from .conftest import ROOT

# Runs in a fresh interpreter: any socket connection or name lookup during the imports is an error.
BLOCKED_IMPORT = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args[:2])
    raise OSError("network access during import")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
if attempts:
    sys.exit(f"network attempts: {attempts}")
"""


RUNTIMES = [name for name in ("onnxruntime", "openvino") if importlib.util.find_spec(name) is not None]
MODULES = ["pipeline.cli", "pipeline.restore_cli", "benchmarks.__main__", *[f"pipeline.stages.{s}" for s in STAGES],
           *RUNTIMES]


def test_importing_makes_no_network_attempt(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # and no NO_ALBUMENTATIONS_UPDATE from outside
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, *MODULES], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
