"""``python -m specdec.kernels``: build the CPU kernels now (``make`` runs it at install)."""

from specdec.kernels import load, status

load(verbose=True)
print(f"specdec kernels: {status()}")
